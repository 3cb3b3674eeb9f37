/* Count the guest instructions a qemu-user process retires; write the total to out=PATH (else stderr) at exit,
 * and the running count at each marker the guest sets: close(MARK_FD) on aarch64 (syscall 57, fails with EBADF and
 * has no other effect). Marks let the caller count a span (the inferences) without the process's start-up and exit,
 * whose count varies from run to run by more than a small model's inference costs.
 * Built by bottlefit.emulation.cost against qemu-plugin.h of the installed qemu (Debian's source package).
 * One inline add per executed translation block: the counter is shared by all vCPUs (guest threads) without
 * atomics, so multi-threaded guests may lose a few adds; the cost runs use one thread. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <qemu-plugin.h>

#define AARCH64_NR_CLOSE 57
#ifndef MARK_FD
#error "build with -DMARK_FD=<bottlefit.emulation.cost.MARK_FD>"
#endif
#define MAX_MARKS 64

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t insns;
static uint64_t marks[MAX_MARKS];
static int n_marks;
static char out_path[4096];

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                       uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num == AARCH64_NR_CLOSE && (uint32_t)a1 == MARK_FD && n_marks < MAX_MARKS) {
        marks[n_marks++] = insns;
    }
}

static void on_exit(qemu_plugin_id_t id, void *p)
{
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    FILE *o = f ? f : stderr;
    fprintf(o, "insns %" PRIu64 "\n", insns);
    for (int i = 0; i < n_marks; i++) {
        fprintf(o, "mark %" PRIu64 "\n", marks[i]);
    }
    if (f) {
        fclose(f);
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof out_path, "%s", argv[i] + 4);
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
