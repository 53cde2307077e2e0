"""analyses package of depthlens."""
