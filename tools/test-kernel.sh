#!/usr/bin/env bash
# Stage 2 of ./run-tests: kernel tests in the lab VM. (Placeholder until the
# kernel lab lands; it then boots Debian's kernel and runs tests/kernel.)
echo "test-kernel: the kernel lab is not in this build yet"
