"""The site data contract (cohort.csv) and its validation, patient-level splits, and the
semi-synthetic multi-site simulator built on labelled public faces.

The simulator (`fahr_core.cohort.simulate`) is not imported here: it needs lifelines, which a
site's training process should not pay to import."""

from fahr_core.cohort.faces import FaceLabelError, FaceRecord, demo_faces_dir, load_labelled_faces
from fahr_core.cohort.schema import Cohort, CohortError, Patient, load_cohort
from fahr_core.cohort.split import split_patients

__all__ = [
    "Cohort",
    "CohortError",
    "FaceLabelError",
    "FaceRecord",
    "Patient",
    "demo_faces_dir",
    "load_cohort",
    "load_labelled_faces",
    "split_patients",
]
