"""specd's engine. Importing this package sets how OpenMP's threads wait, before torch loads.

Every matmul is a parallel region; between regions torch's OpenMP threads wait for the next one.
- Spinning without bound (OpenMP's default under torch) stalls every region when another process
  takes a core: a batch-1 decode step measured 1192 ms instead of 38 with one core busy elsewhere.
- Sleeping at once (OMP_WAIT_POLICY=PASSIVE, specd's setting until session 10) pays a wake-up per
  region. On a 2-core Intel KVM guest that is ~80 us (a 64x64 int8 matmul: 94 us on 2 threads, 13
  on one), and a batch-1 int8 step of ~25 ms makes 121 matmuls.
- So the threads spin a while, then sleep: GOMP_SPINCOUNT=10000. On that guest (session 11,
  benchmarks/forward_cost.py --dtype int8, ms per step at batch 1 / 16, context 600):

  | GOMP_SPINCOUNT | idle | one CPU hog beside it |
  |---|---|---|
  | 1000 | 23.6 / 74.2 | 33.8 / 108.3 |
  | 3000 | 17.9 / 70.9 | 36.6 / 110.3 |
  | 10000 | 15.5 / 65.1 | 62.6 / 132.0 |
  | 30000 | 16.5 / 62.9 | 125.3 / 196.1 |
  | 100000 | 15.4 / 62.1 | 207.8 / 335.5 |
  | PASSIVE | | 27.2 / 98.6 |

  Served over HTTP (benchmarks/serving.py --no-hf, 30 Spec-Bench prompts, back to back): 57.6 /
  117.1 / 172.1 output tok/s at 1 / 4 / 16 clients with 10000, 40.7 / 84.6 / 132.1 with 1000, 61.6 /
  121.9 / 177.6 with 100000. 10000 takes nearly all of the idle gain; longer spins cost a busy
  machine more and more. (1000 was specd's setting in session 10, PASSIVE before it.)
An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins: OMP_WAIT_POLICY=PASSIVE on a machine shared
with busy processes.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
