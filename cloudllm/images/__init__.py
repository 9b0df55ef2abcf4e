"""The serving image: find a builder, build it from containers/, push it, run it under a platform's contract.

Every function shells out to buildah, podman, docker or skopeo; nothing here needs a Docker daemon.
"""
