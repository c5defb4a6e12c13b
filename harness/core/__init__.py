"""What every stage shares: its error types (errors), atomic files and JSON (io), the remedy a
damaged file names (remedy), where a record came from (provenance) and how busy the host was
(host_load)."""
