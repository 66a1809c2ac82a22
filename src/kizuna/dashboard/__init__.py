"""kizuna's dashboard front end, built from ``dashboard/`` (Vite) into ``static/``: package data only."""
