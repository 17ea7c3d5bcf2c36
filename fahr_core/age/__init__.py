"""FAHR-FaceAge: age regression on public faces, its evaluation by decade, and prediction."""
