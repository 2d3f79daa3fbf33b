/* Let Intel MKL take its AVX-512 code paths on AMD CPUs.
 *
 * MKL, which torch's CPU build uses for float32 matmuls, picks its kernels by CPU vendor as well as by
 * instruction set: on an AMD CPU with AVX-512 it runs the AVX2 kernels, at about half the speed (measured
 * on a 2-core AMD EPYC: 190 GFLOP/s against 420 with this override, n = 1024..2048). Loaded with
 * LD_PRELOAD, this definition replaces MKL's own vendor check, so the dispatch follows the instruction set
 * alone. It changes which kernels run (and so the rounding order inside a matmul), nothing else.
 *
 *   make native    ->  .venv/lib/libmkl_intel_cpu.so
 *   LD_PRELOAD=.venv/lib/libmkl_intel_cpu.so twin train ...
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
