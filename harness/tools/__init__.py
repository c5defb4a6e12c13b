"""Tools around the pipeline: make gpu-check (gpu_check, cuda_probe), the offline wheelhouse
(wheelhouse) and a venv over a host's own torch (host_site)."""
