"""probes package of depthlens."""
