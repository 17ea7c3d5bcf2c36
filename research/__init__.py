"""fahr_research: the researcher CLI `fahr` (pre-training, age models, cohorts, certificates, the demo).

Neither federation side imports it."""
