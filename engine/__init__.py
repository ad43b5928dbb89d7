"""specd's engine. Importing this package sets how OpenMP's threads wait, before torch loads.

Every matmul is a parallel region; between regions torch's OpenMP threads wait for the next one.
- Spinning without bound (OpenMP's default under torch) stalls every region when another process
  takes a core: a batch-1 decode step measured 1192 ms instead of 38 with one core busy elsewhere.
- Sleeping at once (OMP_WAIT_POLICY=PASSIVE, specd's setting until session 10) pays a wake-up per
  region. On a 2-core Intel KVM guest that is ~80 us (a 64x64 int8 matmul: 94 us on 2 threads, 13
  on one), and a batch-1 int8 step of ~25 ms makes 121 matmuls.
- So the threads spin briefly, then sleep: GOMP_SPINCOUNT=1000 (tens of microseconds). Served
  over HTTP on that guest (benchmarks/serving.py, 30 Spec-Bench prompts, back-to-back runs): 38.2 /
  77.5 / 116.3 output tok/s at 1 / 4 / 16 clients against 36.0 / 74.4 / 104.5 passive; a batch-1
  step with a CPU hog on the other core cost the same either way (47.7 vs 47.6 ms). On the 2-core
  AMD dev CPU: 14.7-15.6 ms against 16.5-17.1 idle, but 29 against 23 with a hog, hence the opt-out.
An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins: OMP_WAIT_POLICY=PASSIVE on a machine shared
with busy processes.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"
