"""Client SDK: ``InferenceClient`` (asyncio), ``SyncInferenceClient`` (blocking), typed errors."""

from services.client.errors import (Cancelled, DeadlineExceeded, Internal, InvalidArgument, NotFound,
                                    ResourceExhausted, Unavailable, XdsClientError)
from services.client.sdk import Completion, Delta, InferenceClient, ModelInfo
from services.client.sync import SyncInferenceClient

__all__ = ["InferenceClient", "SyncInferenceClient", "Delta", "Completion", "ModelInfo", "XdsClientError",
           "InvalidArgument", "NotFound", "Unavailable", "DeadlineExceeded", "ResourceExhausted", "Cancelled",
           "Internal"]
