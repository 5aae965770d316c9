"""`python -m ditscope` (what torchrun launches: `torchrun --nproc-per-node N -m ditscope profile ...`)."""

from .cli.main import main

main()
