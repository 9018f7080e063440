import KVMIBrokerCore

/// Zero-touch enrolment: the host-wide file the patched QEMU reads at every start
/// (`CONFIG_QEMU_CONFDIR/introspection-broker.conf`, i.e. /etc/qemu), also under libvirt's
/// `-no-user-config`, so that guests need no per-domain XML that Nova or KubeVirt would drop
/// when they regenerate it (Documentation/qemu-patches.md, "Zero-touch enrolment").
public enum HostWideEnrollment {
    /// Where the packaged QEMU (built with `--sysconfdir=/etc`) looks for the file.
    public static let defaultPath = "/etc/qemu/introspection-broker.conf"

    /// The file's text in QEMU's `-readconfig` syntax. `required` holds every guest's vCPUs
    /// until the broker hooks or releases it (also when the broker is down).
    public static func fileText(enabled: Bool, channelSocket: String, required: Bool = false) throws(BrokerError) -> String {
        // The -readconfig syntax has no escapes: a value ends at the first double quote.
        guard channelSocket.hasPrefix("/"), !channelSocket.contains(where: { $0 == "\"" || $0.isNewline }),
            channelSocket.utf8.count < 1000
        else {
            throw BrokerError(
                .invalidArgument,
                "channel socket path '\(escapedForLog(channelSocket, limit: 200))' is not an absolute path without double quotes or line breaks, shorter than 1000 bytes"
            )
        }
        return """
            # kvmi-broker: host-wide (zero-touch) enrolment, written by 'kvmi-broker enroll --host-wide'
            # (and 'kvmi-broker unenroll --host-wide'). The patched QEMU (kvmi-broker-qemu) reads this
            # file whenever it starts, also under libvirt's -no-user-config, and connects every KVM
            # guest started with -uuid to the broker, unless the guest's command line has an
            # introspection-broker object of its own. The broker's policy decides: guests it does not
            # introspect are released and run as usual; with the broker down, guests start normally
            # unless the policy requires introspection (the libvirt hook refuses those).
            # Syntax: QEMU's -readconfig format. Keys: enabled, path, reconnect-ms, unhook-timeout,
            # shutdown-timeout, required, required-timeout.
            # See /usr/share/doc/kvmi-broker-qemu/qemu-patches.md, "Zero-touch enrolment".
            [introspection-broker]
              enabled = "\(enabled ? "on" : "off")"
              path = "\(channelSocket)"
              reconnect-ms = "1000"

            """ + (required ? "  required = \"on\"\n" : "")
    }
}
