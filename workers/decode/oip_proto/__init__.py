"""The Open Inference Protocol's gRPC messages and service stubs (package ``inference``, service
``GRPCInferenceService``), as KServe, Triton and MLServer serve them.

Origin: ``open_inference_grpc.proto`` is the protocol's published definition, unchanged, from
github.com/kserve/open-inference-protocol, ``specification/protocol/open_inference_grpc.proto`` at commit
d49cc23f89d709d87b210ef9449e273ae243984e (Apache License 2.0, its header kept). The ``*_pb2*.py``/``.pyi`` files
are generated from it by ``make grpc-stubs`` (grpcio-tools, pinned in the test extra) and never edited by hand;
``tests/test_grpc.py`` fails when they differ from what the pinned generator writes. Triton's own
``grpc_service.proto`` is a superset with the same package, names and field numbers, so its clients
(tritonclient.grpc) and KServe's ``InferenceGRPCClient`` talk to this service unchanged.

A process should import only one definition of ``inference.*`` messages (protobuf's default descriptor pool
refuses a second file defining the same names): a test that uses tritonclient.grpc runs the server in another
process.
"""
