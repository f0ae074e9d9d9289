#!/usr/bin/env bash
# Stage 3 of ./run-tests: build and run the container image with buildah.
# (Placeholder until the Dockerfile lands.)
echo "test-image: the container image is not in this build yet"
