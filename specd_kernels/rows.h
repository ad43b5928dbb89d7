/* specd: when the CPU kernels' row loops split rows across threads (specd_kernels/rowscale/cpu.c,
 * specd_kernels/rope/cpu.c, specd_kernels/bf16_rows/cpu.c). Each row's own loops never split, so its bits never
 * depend on the other rows. From 4 rows on: a batch-1 step makes ~240 such calls, where waking a
 * second thread costs more than the row. */
#ifndef SPECD_ROWS_H
#define SPECD_ROWS_H
#define PARALLEL_ROWS 4
#endif
