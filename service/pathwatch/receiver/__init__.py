"""Receiver: OTLP/gRPC Export requests in, observations out to the store's writer."""

from pathwatch.receiver.decode import Decoder, DecodeResult, InvalidRequest, TimeBounds
from pathwatch.receiver.grpc_server import OtlpGrpcReceiver

__all__ = ["DecodeResult", "Decoder", "InvalidRequest", "OtlpGrpcReceiver", "TimeBounds"]
