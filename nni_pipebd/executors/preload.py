"""Imported by the worker fork server alone: signals ignored, CUDA untouched, the worker code loaded once."""

import os
import signal

# Workers are forked from this process with its signal dispositions: SIGINT / SIGTERM sent to the process group
# while a worker starts must not kill it before it installs its own handlers (as spawned workers, started with both
# ignored). The server itself stops when the lead does, not on these signals.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)

# The server dies with the lead at once, however the lead dies (an exiting interpreter that imported torch takes
# seconds), and its workers with it: their own death signal is tied to the server.
from nni_pipebd.executors.stopping import die_with_parent  # noqa: E402  (standard library only)

die_with_parent()

# A library that asks torch.cuda.is_available() while importing must not initialise CUDA here: a forked child of a
# process with CUDA initialised cannot use CUDA (torch says so in the worker). The NVML check does not initialise
# it; nothing imported here creates a CUDA context.
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

import nni_pipebd  # noqa: E402  (hides the known third-party warnings when the command asked for it)
import nni_pipebd.executors.autoplan  # noqa: E402,F401
import nni_pipebd.executors.launch  # noqa: E402,F401
