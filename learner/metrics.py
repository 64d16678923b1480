"""Prometheus metrics of the learner (``himac_learner_*``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_VERSIONS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
PHASES = ("macro", "micro", "flat")


class LearnerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.groups_received = Counter("himac_learner_groups_received_total", "Groups durably accepted",
                                       ("actor", "level"), registry=r)
        self._dropped = Counter("himac_learner_groups_dropped_total", "Groups dropped, by reason", ("reason",),
                                registry=r)
        self._rejected = Counter("himac_learner_frames_rejected_total", "Frames rejected before decoding to a "
                                 "usable message, by socket and reason", ("socket", "reason"), registry=r)
        self.groups_consumed = Counter("himac_learner_groups_consumed_total", "Groups trained on", ("level",),
                                       registry=r)
        self.staleness = Histogram("himac_learner_staleness_versions", "Learner version minus the group's version "
                                   "at consumption", buckets=_VERSIONS, registry=r)
        self.step_seconds = Histogram("himac_learner_step_seconds", "Seconds per optimiser step (compute)",
                                      buckets=_SECONDS, registry=r)
        self.idle_seconds = Counter("himac_learner_idle_seconds_total", "Seconds spent waiting for groups",
                                    registry=r)
        self.busy_seconds = Counter("himac_learner_busy_seconds_total", "Seconds spent training and publishing",
                                    registry=r)
        self.publish_seconds = Histogram("himac_learner_weight_publish_seconds", "Seconds to serialise and publish "
                                         "a weights version", buckets=_SECONDS, registry=r)
        self.steps = Counter("himac_learner_steps_total", "Optimiser steps taken", registry=r)
        self.skipped_steps = Counter("himac_learner_skipped_steps_total", "Steps skipped for a non-finite loss or "
                                     "gradient", registry=r)
        self.policy_version = Gauge("himac_learner_policy_version", "Latest weights version", registry=r)
        self._phase = Gauge("himac_learner_phase", "1 for the current co-evolution phase", ("phase",), registry=r)
        self.loss = Gauge("himac_learner_loss", "Loss of the last step", registry=r)
        self.reward_mean = Gauge("himac_learner_reward_mean", "Mean episode return in the last batch", ("phase",),
                                 registry=r)
        self.success_rate = Gauge("himac_learner_success_rate", "Fraction of episodes won in the last batch",
                                  ("phase",), registry=r)
        self.adv_mean = Gauge("himac_learner_advantage_mean", "Mean advantage over trained tokens", registry=r)
        self.adv_std = Gauge("himac_learner_advantage_std", "Std of advantages over trained tokens", registry=r)
        self.degenerate = Counter("himac_learner_degenerate_groups_total", "Groups whose returns were all equal "
                                  "(zero advantage)", registry=r)
        self.actors = Gauge("himac_learner_actors", "Actors that said hello", registry=r)
        self.queue = Gauge("himac_learner_queue_groups", "Accepted groups waiting to be trained on", registry=r)
        self.idle_fraction = Gauge("himac_learner_idle_fraction", "Idle / (idle + busy) since start", registry=r)

    def dropped(self, reason: str) -> None:
        self._dropped.labels(reason=reason).inc()

    def rejected(self, reason: str, socket: str = "data") -> None:
        self._rejected.labels(socket=socket, reason=reason).inc()

    def set_phase(self, phase: str) -> None:
        for p in PHASES:
            self._phase.labels(phase=p).set(1.0 if p == phase else 0.0)
