"""The kubelet device plugin API v1beta1: api.proto (written out from Kubernetes' published
API) and the Python code grpcio-tools generates from it (api_pb2.py, api_pb2_grpc.py).

Generated files are committed; scripts/gen-deviceplugin regenerates them. Only
`cdi-hook device-plugin` imports this package (and so grpc): never the hook.
"""
