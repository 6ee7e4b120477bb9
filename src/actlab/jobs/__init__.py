"""Jobs: what the CLI and bench scripts run (profile, sparsify, eval, export, bench), composed from the
library's parts; each uses the one setup helper (`jobs.setup`)."""
