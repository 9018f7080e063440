/* libvirt for Swift: the public headers plus what Swift 6 cannot use directly.
 * Symbols are prefixed kvmib_virt_. */
#ifndef KVMIB_VIRT_SHIM_H
#define KVMIB_VIRT_SHIM_H

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <stdlib.h>

/* C globals are rejected by strict concurrency: read them through getters. */
static inline virConnectAuthPtr kvmib_virt_auth_default(void) { return virConnectAuthPtrDefault; }

static inline void kvmib_virt_ignore_error(void *userdata, virErrorPtr error) {
    (void)userdata;
    (void)error;
}

/* libvirt prints every error to stderr unless an error function is set; the broker reports
 * errors itself (virGetLastError), so silence the default printer. */
static inline void kvmib_virt_silence_errors(void) { virSetErrorFunc(NULL, kvmib_virt_ignore_error); }

/* VIR_DOMAIN_EVENT_CALLBACK() is a cast macro, not imported; these do the same cast. */
static inline virConnectDomainEventGenericCallback kvmib_virt_lifecycle_callback(virConnectDomainEventCallback cb) {
    return VIR_DOMAIN_EVENT_CALLBACK(cb);
}
static inline virConnectDomainEventGenericCallback
kvmib_virt_metadata_callback(virConnectDomainEventMetadataChangeCallback cb) {
    return VIR_DOMAIN_EVENT_CALLBACK(cb);
}

#endif
