"""The dashboard's views, one module each (`app.py` composes them): `sidebar`, `explore`, `why`,
`layers`, `lens`, `sweep`, `compare`, `corpus`; `common` holds what several share. UI only: every
model, policy and statistics call goes through `dashboard.service`, `analysis` or `gateskip_core`."""
