/*
 * QEMU TCG plugin: counts the instructions the guest runs, in the kernel (translation blocks at or above
 * the 3G/1G split, 0xC0000000) and elsewhere (user space, U-Boot, the kernel's decompressor), and writes
 * both counters with the host's wall clock every 20 ms to the file out=PATH names. Used by
 * qemu/insncount.py (INSNS=1 make boot-time): a boot's wall time moves by a quarter with this host's
 * load, its instruction count by a tenth at most (user space: under 1%).
 *
 * Debian's QEMU 7.2 ships no plugin header and none of QEMU's example plugins, so the few declarations of
 * its plugin API (version 1) used here are written out below.
 *
 * The inline counters are not atomic: the two vCPUs' threads may lose an update to each other now and then,
 * which costs less than a percent and no speed (a callback per block would cost both).
 */
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct {
	const char *target_name;
	struct { int min; int cur; } version;
	bool system_emulation;
	union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
					      uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

#define EXPORT __attribute__((visibility("default")))
#define KERNEL_START 0xC0000000u
#define SAMPLE_US 20000

EXPORT int qemu_plugin_version = 1;

static uint64_t kernel_insns, other_insns;
static FILE *samples;

static void translated(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	uint64_t *counter = qemu_plugin_tb_vaddr(tb) >= KERNEL_START ? &kernel_insns : &other_insns;

	(void)id;
	qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, counter, qemu_plugin_tb_n_insns(tb));
}

static void *sample(void *unused)
{
	struct timespec now;

	(void)unused;
	for (;;) {
		clock_gettime(CLOCK_REALTIME, &now);
		fprintf(samples, "%lld.%06ld %llu %llu\n", (long long)now.tv_sec, now.tv_nsec / 1000,
			(unsigned long long)__atomic_load_n(&kernel_insns, __ATOMIC_RELAXED),
			(unsigned long long)__atomic_load_n(&other_insns, __ATOMIC_RELAXED));
		fflush(samples);
		usleep(SAMPLE_US);
	}
	return NULL;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
	const char *path = NULL;
	pthread_t sampler;
	int i;

	(void)info;
	for (i = 0; i < argc; i++)
		if (strncmp(argv[i], "out=", 4) == 0)
			path = argv[i] + 4;
	if (path == NULL || (samples = fopen(path, "w")) == NULL) {
		fprintf(stderr, "insncount: give out=PATH, a file it can write\n");
		return -1;
	}
	if (pthread_create(&sampler, NULL, sample, NULL) != 0)
		return -1;
	pthread_detach(sampler);
	qemu_plugin_register_vcpu_tb_trans_cb(id, translated);
	return 0;
}
