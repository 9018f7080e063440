/*
 * kvmi-kernel-double: wire and ioctl layouts of the two KVMI ABI generations.
 *
 * TEST EQUIPMENT ONLY. This header belongs to the *kernel double*, a stand-in
 * for a KVM kernel with VM introspection (KVMI). It is never used in production.
 *
 * The layouts are written from the public sources listed in
 * Documentation/kernel-double.md ("Sources"); nothing here is copied code.
 * All values are host byte order (x86_64, little-endian), as KVMI is.
 */
#ifndef KVMI_KERNEL_DOUBLE_ABI_H
#define KVMI_KERNEL_DOUBLE_ABI_H

#include <stdint.h>

/* ---- ioctl numbers (x86_64, KVMIO = 0xAE) ---------------------------------- */

/* "v7": KVM-VMI kvm branch kvmi-v7 (production), libkvmi master, QEMU kvmi-v7 */
#define KD_V7_HOOK       0x4018AEFFUL /* _IOW(KVMIO, 0xff, 24-byte hook)    */
#define KD_V7_PREUNHOOK  0x0000AEFEUL /* _IO(KVMIO, 0xfe)                   */
#define KD_V7_COMMAND    0x4008AEFDUL /* _IOW(KVMIO, 0xfd, 8-byte feature)  */
#define KD_V7_EVENT      0x4008AEFCUL /* _IOW(KVMIO, 0xfc, 8-byte feature)  */
#define KD_V7_UNHOOK     0x0000AEFBUL /* _IO(KVMIO, 0xfb)                   */

/* "v12": last upstream submission (2021-10-06), QEMU kvmi-v12 */
#define KD_V12_HOOK      0x4018AEC8UL
#define KD_V12_UNHOOK    0x0000AEC9UL
#define KD_V12_COMMAND   0x4008AECAUL
#define KD_V12_EVENT     0x4008AECBUL
#define KD_V12_PREUNHOOK 0x0000AECCUL

/* ioctl argument structs (identical in both generations) */
struct kd_introspection_hook {
	int32_t fd;
	uint32_t padding;      /* must be 0, else EINVAL */
	uint8_t uuid[16];
};                             /* 24 bytes */

struct kd_introspection_feature {
	uint32_t allow;        /* 0 or 1, else EINVAL */
	int32_t id;            /* -1 = all */
};                             /* 8 bytes */

/* ---- common wire structs ------------------------------------------------------ */

struct kd_msg_hdr {
	uint16_t id;
	uint16_t size;         /* bytes that follow this header */
	uint32_t seq;
};                             /* 8 bytes */

struct kd_error_code {
	int32_t err;           /* 0 or a negative KVM_E* value */
	uint32_t padding;
};                             /* 8 bytes */

/* KVM_E* values (include/uapi/linux/kvm_para.h); replies carry them negated */
#define KD_KVM_ENOENT      2
#define KD_KVM_EPERM       1
#define KD_KVM_EINVAL      22
#define KD_KVM_EOPNOTSUPP  95
#define KD_KVM_ENOSYS      1000

/* KVMI_MSG_SIZE (v7) and KVMI_MAX_MSG_SIZE (v12): 4096 * 2 - 8 */
#define KD_MAX_MSG_SIZE    8184
#define KD_KVMI_VERSION    1

/* body of *_CHECK_COMMAND and *_CHECK_EVENT, both generations */
struct kd_check_id {
	uint16_t id;
	uint16_t padding1;
	uint32_t padding2;
};                             /* 8 bytes */

/* body of KVMI_VM_CONTROL_EVENTS (v12) / KVMI_CONTROL_VM_EVENTS (v7) */
struct kd_control_vm_events {
	uint16_t event_id;
	uint8_t enable;
	uint8_t padding1;
	uint32_t padding2;
};                             /* 8 bytes */

/* ---- v12 ---------------------------------------------------------------------- */

#define KD_V12_VM_EVENT              0   /* carrier of VM events        */
#define KD_V12_VCPU_EVENT            1   /* carrier of vCPU events/replies */
#define KD_V12_GET_VERSION           2
#define KD_V12_VM_CHECK_COMMAND      4
#define KD_V12_VM_CHECK_EVENT        6
#define KD_V12_VM_GET_INFO           8
#define KD_V12_VM_CONTROL_EVENTS     10
#define KD_V12_NUM_COMMANDS          30
#define KD_V12_NUM_EVENTS            20
#define KD_V12_EVENT_UNHOOK          0

struct kd_v12_get_version_reply {
	uint32_t version;
	uint32_t max_msg_size;
	struct {               /* struct kvmi_features (x86) */
		uint8_t singlestep;
		uint8_t padding[7];
	} features;
};                             /* 16 bytes */

struct kd_v12_event_hdr {      /* struct kvmi_event_hdr */
	uint16_t event;
	uint16_t padding[3];
};                             /* 8 bytes */

/* ---- v7 (production) ---------------------------------------------------------- */

#define KD_V7_EVENT_REPLY            0
#define KD_V7_EVENT_MSG              1   /* KVMI_EVENT: carrier of every event */
#define KD_V7_GET_VERSION            2
#define KD_V7_VM_CHECK_COMMAND       3
#define KD_V7_VM_CHECK_EVENT         4
#define KD_V7_VM_GET_INFO            5
#define KD_V7_VM_CONTROL_EVENTS      8
#define KD_V7_NUM_COMMANDS           64  /* KVMI_NUM_MESSAGES */
#define KD_V7_NUM_EVENTS             14  /* KVMI_EVENT_CPUID (13) + 1 */
#define KD_V7_EVENT_UNHOOK           0
#define KD_V7_EVENT_CREATE_VCPU      9
#define KD_V7_EVENT_CMD_ERROR        12

struct kd_v7_get_version_reply {
	uint32_t version;
	uint32_t padding;
	struct {               /* struct kvmi_features (x86, v7) */
		uint8_t spp;
		uint8_t vmfunc;
		uint8_t eptp;
		uint8_t ve;
		uint8_t padding[4];
	} features;
};                             /* 16 bytes */

/*
 * struct kvmi_event (v7): the common part of every event, VM events included.
 *   0  u16 size        = sizeof(struct kvmi_event) = 544
 *   2  u16 vcpu
 *   4  u8  event
 *   5  u8  padding[3]
 *   8  struct kvmi_event_arch (536 bytes):
 *        8  u8 mode, u8 padding1, u16 view, u32 padding2
 *       16  struct kvm_regs  (144 bytes)
 *      160  struct kvm_sregs (312 bytes)
 *      472  9 x u64 msrs (72 bytes)
 *    544  end
 */
#define KD_V7_KVM_REGS_SIZE   144
#define KD_V7_KVM_SREGS_SIZE  312
#define KD_V7_EVENT_ARCH_SIZE (8 + KD_V7_KVM_REGS_SIZE + KD_V7_KVM_SREGS_SIZE + 9 * 8)
#define KD_V7_EVENT_SIZE      (8 + KD_V7_EVENT_ARCH_SIZE)

struct kd_v7_event {
	uint16_t size;
	uint16_t vcpu;
	uint8_t event;
	uint8_t padding[3];
	uint8_t arch[KD_V7_EVENT_ARCH_SIZE];
};

_Static_assert(sizeof(struct kd_introspection_hook) == 24, "hook layout");
_Static_assert(sizeof(struct kd_introspection_feature) == 8, "feature layout");
_Static_assert(sizeof(struct kd_msg_hdr) == 8, "msg hdr layout");
_Static_assert(sizeof(struct kd_error_code) == 8, "error code layout");
_Static_assert(sizeof(struct kd_v12_get_version_reply) == 16, "v12 version layout");
_Static_assert(sizeof(struct kd_v7_get_version_reply) == 16, "v7 version layout");
_Static_assert(sizeof(struct kd_v12_event_hdr) == 8, "v12 event hdr layout");
_Static_assert(sizeof(struct kd_v7_event) == 544, "v7 kvmi_event layout");

#if defined(__has_include)
#if __has_include(<linux/kvm.h>)
#include <linux/kvm.h>
_Static_assert(sizeof(struct kvm_regs) == KD_V7_KVM_REGS_SIZE, "kvm_regs size");
_Static_assert(sizeof(struct kvm_sregs) == KD_V7_KVM_SREGS_SIZE, "kvm_sregs size");
#endif
#endif

#endif /* KVMI_KERNEL_DOUBLE_ABI_H */
