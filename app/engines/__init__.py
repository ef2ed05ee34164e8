"""Optional engines behind the same interfaces as the in-process one."""
