"""finetune package of depthlens."""
