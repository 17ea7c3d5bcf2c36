"""Everything a hospital site does in a federation round, callable without Flower.

Flower starts a fresh ClientApp process for every message, so nothing lives in memory between
rounds: the site's state is on disk in its workdir (privacy ledger, decoded-face cache, last
global weights, report). The ClientApp in fahr_client is a thin adapter over `SiteRuntime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fahr_core.age.delivery import DeliveredAgeModel, receive_age_model
from fahr_core.age.predict import predict_ages
from fahr_core.cohort import Cohort, load_cohort, split_patients
from fahr_core.config import ModelConfig, SiteConfig
from fahr_core.faces.detect import BlazeFaceDetector, Detector, insightface_detector
from fahr_core.faces.images import load_faces
from fahr_core.faces.pipeline import AlignmentTable, Progress, align_photos, alignment_summary
from fahr_core.faces.qc import QCConfig
from fahr_core.io import atomic_write_json
from fahr_core.models.checkpoint import save_weights
from fahr_core.models.device import placed_on
from fahr_core.models.finetune import merge, site_model, split_state
from fahr_core.models.saliency import MIN_PATIENTS_FOR_SALIENCY, CohortSaliency, cohort_saliency
from fahr_core.models.vit import SurvivalViT
from fahr_core.privacy.audit import EVALUATION_ADMITTED, append_audit, evaluations_in_run
from fahr_core.privacy.ledger import PrivacyLedger, locked
from fahr_core.protocol import keys
from fahr_core.protocol.outbound import suppress_small_cells
from fahr_core.protocol.spec import spec_to_record
from fahr_core.protocol.wire import privacy_metrics, summary_to_metrics
from fahr_core.report.summary import PatientScores, SiteContext, SiteSummary
from fahr_core.survival.predict import survival_at
from fahr_core.train.local import SurvivalData, patient_risk, train_dp

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteSplit:
    train: SurvivalData
    test: SurvivalData
    train_cohort: Cohort
    test_cohort: Cohort  # the held-out patients: the validation report's cohort
    qc: dict  # alignment quality control counts for the report


def _as_data(cohort: Cohort, images: np.ndarray, index: dict[Path, int]) -> SurvivalData:
    return SurvivalData(
        images=images,
        photos=tuple(tuple(index[p] for p in pt.photos) for pt in cohort.patients),
        time=cohort.time.astype(np.float32),
        event=cohort.event.astype(np.int64),
    )


def _own_photos(data: SurvivalData) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Only these patients' faces, and their photo indices into them (`images` holds every patient's)."""
    used = sorted({i for idx in data.photos for i in idx})
    where = {i: k for k, i in enumerate(used)}
    return data.images[used], tuple(tuple(where[i] for i in idx) for idx in data.photos)


class EvaluationRefused(RuntimeError):
    """The server asked for an evaluation in a run the site did not train in, or beyond its per-run cap."""


class SiteRuntime:
    def __init__(self, cfg: SiteConfig):
        self.cfg = cfg
        cfg.workdir.mkdir(parents=True, exist_ok=True)

    def detector(self) -> Detector:
        a = self.cfg.alignment
        if a.detector == "insightface":
            return insightface_detector(a.model_dir)
        return BlazeFaceDetector()

    def align(
        self, cohort: Cohort, progress: Progress | None = None, workers: int | None = None
    ) -> AlignmentTable:
        """Detect, quality-check and align every photo of the cohort (cached: only new photos do work)."""
        photos = sorted({p for pt in cohort.patients for p in pt.photos})
        if workers is None:
            workers = self.cfg.alignment.workers or None
        return align_photos(
            photos,
            self.cfg.paths.aligned,
            self.detector(),
            QCConfig(),
            workers=workers,
            progress=progress,
        )

    def load(self, img_size: int) -> SiteSplit:
        """Validate the cohort, split the patients, align their photos, decode the aligned faces once.

        The whole validated cohort is split before quality control, so a photo failing alignment can
        never move another patient across the split; then patients none of whose photos could be
        aligned are left out of their part (the report's QC table counts them).
        """
        cohort = load_cohort(self.cfg.data)
        parts = split_patients(cohort, self.cfg.test_fraction, self.cfg.split_seed)
        table = self.align(cohort, workers=1)  # normally all cached: `fahr-client start` aligned them
        crops = {Path(r.path): table.crop_path(r) for r in table.aligned}
        train, test = (
            replace(
                part,
                patients=tuple(
                    replace(pt, photos=tuple(p for p in pt.photos if p in crops))
                    for pt in part.patients
                    if any(p in crops for p in pt.photos)
                ),
            )
            for part in parts
        )
        kept = train.patients + test.patients
        photos = sorted({p for pt in kept for p in pt.photos})
        images = load_faces([crops[p] for p in photos], img_size, self.cfg.paths.face_cache)
        index = {p: i for i, p in enumerate(photos)}
        qc = alignment_summary(table, len(cohort) - len(kept))
        return SiteSplit(_as_data(train, images, index), _as_data(test, images, index), train, test, qc)

    def ledger(self, n_train: int) -> PrivacyLedger:
        p = self.cfg.privacy
        return PrivacyLedger.open(self.cfg.paths.ledger, p.epsilon, p.delta, n_train)

    def train_round(
        self,
        state: State,
        spec: ModelConfig,
        server_round: int,
        num_rounds: int,
        server_record: tuple[int, float] | None = None,
        run_id: int | None = None,
    ) -> tuple[State, dict[str, float]]:
        """One round of local DP training from the global `state`; returns the trained tensors and metrics.

        `state` holds the trainable tensors (and, in a run's first round, the frozen base); what is
        returned is only the trainable tensors, in float32 (fahr_core.models.finetune).
        `server_record` is (rounds, epsilon) the server has on record for this site: a ledger
        showing less refuses the round (LedgerBehindServer). The ledger stays locked from opening
        to recording, so concurrent trainings of this site run one after the other. The ledger records
        the federation `run_id`: the site evaluates server weights only in runs it trained in.
        """
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        split = self.load(spec.img_size)
        model = site_model(state, spec, self.cfg.paths.frozen_base)
        with locked(self.cfg.paths.ledger):
            ledger = self.ledger(len(split.train))
            if server_record is not None:
                ledger.require_server_record(*server_record)
            stats = train_dp(
                model,
                split.train,
                self.cfg.train,
                self.cfg.privacy,
                ledger,
                rounds_left=num_rounds - server_round + 1,
                horizon=spec.horizon_years,
                round_info={"server_round": server_round, "num_rounds": num_rounds, "run_id": run_id},
            )
        new_state, _ = split_state(model)
        # the loss and the time taken stay in the site's own log: with crafted global weights either
        # would tell the server whether a patient is in the data (fahr_core.protocol.outbound)
        metrics = {
            keys.NUM_EXAMPLES: stats.n,
            keys.EPSILON: stats.epsilon,
            keys.DELTA: stats.delta,
            keys.EPSILON_BUDGET: ledger.budget,
            keys.NOISE_MULTIPLIER: stats.noise_multiplier,
            keys.SAMPLE_RATE: stats.sample_rate,
            keys.STEPS: stats.steps,
        }
        log.info(  # DP training speed (images/s, setup included) is for the site's operator only
            "site %s round %d: loss %.4f, %.1f s, %.1f images/s (DP-SGD, %s clipping, on %s), "
            "epsilon %.3f / %g",
            self.cfg.name,
            server_round,
            stats.loss,
            stats.seconds,
            stats.images / max(stats.seconds, 1e-9),
            self.cfg.train.clipping,
            stats.device,
            stats.epsilon,
            ledger.budget,
        )
        return new_state, metrics

    def receive_age_model(self, payload: np.ndarray, sha256: str) -> DeliveredAgeModel:
        """Check and keep the federation's age model the server sent (see fahr_core.age.delivery)."""
        return receive_age_model(payload, sha256, self.cfg.paths.age_model)

    def _fad_and_saliency(
        self, model: SurvivalViT, test: SurvivalData, age: np.ndarray, age_model: DeliveredAgeModel | None
    ) -> tuple[np.ndarray | None, CohortSaliency | None]:
        """Face-age deviation per held-out patient (mean over photos) and both models' mean saliency.

        Saliency needs MIN_PATIENTS_FOR_SALIENCY patients: a mean over fewer faces would show individuals.
        """
        images, photos = _own_photos(test)
        fad = None
        scorers = {"Survival risk score": lambda x: model(x)[0]}
        if age_model is not None:
            with placed_on(age_model.model):
                predicted = predict_ages(age_model.model, images)
            fad = np.array([predicted[list(idx)].mean() for idx in photos]) - age
            scorers["Predicted age"] = age_model.model
        if len(test) < MIN_PATIENTS_FOR_SALIENCY:
            return fad, None
        return fad, cohort_saliency(scorers, images)

    def admit_evaluation(self, run_id: int, server_round: int) -> None:
        """Count an evaluation of server weights in federation run `run_id`, or refuse it.

        Every evaluation releases non-DP aggregates of the held-out patients for whatever weights the
        server chose, so the site, not the server, decides how many it answers: only in runs it trained
        in (its ledger records the run, so the privacy budget bounds the runs) and at most
        `[privacy].evaluations_per_run` in each. The attempt is written to the audit log before any
        scoring, so an evaluation that fails later still counts. The lock makes count and append one
        step: two concurrent requests cannot both pass the count.
        """
        with locked(self.cfg.paths.audit):
            if not any(r.get("run_id") == run_id for r in self.ledger(0).rounds):
                raise EvaluationRefused(
                    f"site {self.cfg.name} did not train in run {run_id}; it evaluates server weights only "
                    "in runs it trained in"
                )
            done = evaluations_in_run(self.cfg.paths.audit, run_id)
            allowed = self.cfg.privacy.evaluations_per_run
            if done >= allowed:
                raise EvaluationRefused(
                    f"site {self.cfg.name} already admitted {done} evaluation(s) in run {run_id}; its "
                    f"config allows {allowed} per run ([privacy].evaluations_per_run)"
                )
            append_audit(self.cfg.paths.audit, EVALUATION_ADMITTED, server_round, run_id, {}, {})

    def evaluate(
        self, state: State, spec: ModelConfig, meta: dict, age_model: DeliveredAgeModel | None = None
    ) -> tuple[dict[str, float], dict]:
        """Score the held-out split with the global model and write the site's validation report.

        With the federation's `age_model`, the report adds the face-age deviation analysis; the mean saliency
        maps of the survival model (and of the age model, if any) are drawn for 10 or more patients.
        Returns the scalar metrics for the server and the report's summary (aggregates only); if scoring or
        any statistic fails, the metrics of a suppressed evaluation and an empty summary.
        """
        split = self.load(spec.img_size)
        model = merge(site_model(state, spec, self.cfg.paths.frozen_base))
        save_weights(
            self.cfg.paths.global_model,
            model.state_dict(),
            {"arch": spec.arch, "img_size": str(spec.img_size)},
        )
        ledger = self.ledger(len(split.train))
        privacy = {
            "epsilon": round(ledger.epsilon, 4),
            "epsilon_prv": round(ledger.epsilon_prv, 4),  # the same history, PRV accountant (not enforced)
            "delta": ledger.delta,
            "budget": ledger.budget,
            "accountant": "RDP (Opacus), composed over every round in the site ledger",
            "rounds_trained": len(ledger.rounds),
            "max_grad_norm": self.cfg.privacy.max_grad_norm,
        }
        meta = {
            **meta,
            "model": spec_to_record(spec),
            "site_config": {
                "split_seed": self.cfg.split_seed,
                "test_fraction": self.cfg.test_fraction,
                "train_patients": len(split.train),
            },
        }
        # Whether scoring works depends on the held-out patients when the server chose the weights (one
        # face's risk made non-finite), so a failure answers as a suppressed evaluation does: the same
        # metrics, nothing data-dependent, nothing that tells the server scoring failed.
        try:
            summary = self._report(model, split, spec, meta, privacy, age_model)
        except Exception:
            log.exception("site %s: the evaluation failed; the reply carries no statistics", self.cfg.name)
            return suppress_small_cells(privacy_metrics(privacy)), {}
        atomic_write_json(self.cfg.paths.last_evaluation, {"meta": meta, "privacy": privacy})
        return suppress_small_cells(summary_to_metrics(summary)), summary.to_json()

    def _report(
        self,
        model: SurvivalViT,
        split: SiteSplit,
        spec: ModelConfig,
        meta: dict,
        privacy: dict,
        age_model: DeliveredAgeModel | None,
    ) -> SiteSummary:
        """Score the held-out patients, write the validation report, return its summary."""
        from fahr_core.report.site import write_site_report  # lifelines/matplotlib: evaluation only

        risk = patient_risk(model, split.test)  # non-finite scores raise in the metrics: model unusable
        test = split.test_cohort
        alpha = model.head.baseline.weight.detach().squeeze(-1).numpy()
        fad, saliency = self._fad_and_saliency(model, split.test, test.age, age_model)
        scores = PatientScores(
            split.test.time,
            split.test.event,
            risk,
            age=test.age,
            male=test.is_male.astype(float),
            surv_pred=survival_at(risk, alpha, spec.horizon_years, (1.0, 2.0, 5.0)),
            fad=fad,
        )
        context = SiteContext(
            self.cfg.name,
            privacy,
            meta,
            horizon=spec.horizon_years,
            qc=split.qc,
            age_model=None if age_model is None else age_model.describe(),
        )
        return write_site_report(self.cfg.paths.report, scores, context, saliency)
