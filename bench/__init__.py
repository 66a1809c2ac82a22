"""``make bench``: direct vs kizuna (2 sidecars) vs HAProxy (2 processes); see bench/README.md."""
