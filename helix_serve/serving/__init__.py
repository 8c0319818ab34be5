"""The Ray Serve graph: a FastAPI ingress in front of speculative-decoding engine replicas."""
