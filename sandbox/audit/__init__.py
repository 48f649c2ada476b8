"""Isolation audit: evidence that a sandbox (or any container) holds.

probe_script  the in-container probe (stdlib python3; observes, never judges)
shell_probe   its POSIX sh subset, for containers without python3
syscalls      the dangerous-syscall sample, with arguments harmless if reached
catalog       every check: id, title, CIS Docker Benchmark section 5 id, severity
checks        inside rules: probe observations -> rows
outside       docker inspect, host cgroup files and engine info -> rows
runner        audit a fresh sandbox of a policy, or any running container
report        table, JSON, JUnit, and the Markdown/HTML documents a security team signs
diff          what changed between two saved audits (`sandbox audit diff`)
selftest      startup canaries that fail closed (worker, `sandbox doctor`); imports no CLI module
trail         the per-session, hash-chained audit trail and its verifier
cli           `sandbox audit [...]`, `sandbox audit verify FILE`, `sandbox audit diff OLD NEW`
"""
