"""The site data contract (cohort.csv) and its validation, patient-level splits, and the
semi-synthetic multi-site simulator built on labelled public faces."""

from fahr_core.cohort.faces import FaceLabelError, FaceRecord, demo_faces_dir, load_labelled_faces
from fahr_core.cohort.schema import Cohort, CohortError, Patient, load_cohort
from fahr_core.cohort.simulate import SimulationParams, harrell_c_index, sample_outcomes, simulate_sites
from fahr_core.cohort.split import split_patients

__all__ = [
    "Cohort",
    "CohortError",
    "FaceLabelError",
    "FaceRecord",
    "Patient",
    "SimulationParams",
    "demo_faces_dir",
    "harrell_c_index",
    "load_cohort",
    "load_labelled_faces",
    "sample_outcomes",
    "simulate_sites",
    "split_patients",
]
