"""himac.protocol: the contract between processes (wire messages and the run config).

Depends on nothing of ours and on nothing heavy: importing it never imports torch,
transformers or deepspeed.
"""
from .messages import (  # noqa: F401
    LEVEL_CONTEXT, LEVEL_EXECUTOR, LEVEL_PLANNER, PROTOCOL_VERSION, Ack, Credit, Episode, FetchWeights,
    Heartbeat, Hello, Message, NcclOffer, NcclPull, NcclPush, Rejected, Status, TrajectoryGroup,
    WeightsAnnouncement, WeightsChunk, Welcome, decode, encode, validate_group,
)
