// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "kvmi-broker",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "kvmi-broker", targets: ["kvmi-broker"]),
        .executable(name: "kvmi-test-introspector", targets: ["kvmi-test-introspector"]),
        .executable(name: "kvmi-bench", targets: ["kvmi-bench"]),
    ],
    dependencies: [
        // Subcommands, validation and help text for the CLI (the anchor named in BRIEF section 7).
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // Structured logging with levels and metadata keys; the ecosystem's standard API.
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // Heap for the I/O reactor's deadline queue; Deque for the admission order of connections
        // and a session's mailbox.
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        // The metrics API (counters, gauges, timers) the server ecosystem instruments with.
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        // Prometheus text exposition for it: the ecosystem's exposition library, the format's
        // reference implementation for Swift.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // ServiceGroup: the server ecosystem's standard for running a daemon's parts as services
        // with graceful shutdown on SIGTERM/SIGINT, and UnixSignalsSequence for SIGHUP (reload).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // C shim: only what Swift cannot import (CMSG macros, ioctl numbers and structs, vsock).
        // libsystemd (Debian's libsystemd-dev) is reached through the shim's kvmib_sd_* functions:
        // sd_notify is the reference implementation of systemd's service notification protocol
        // (Type=notify). Its headers stay out of Swift's view: a system-library module that
        // includes <sys/socket.h> textually made the MSG_* and SOCK_* constants resolve
        // differently from one build to the next.
        .target(name: "CKVMIBroker", linkerSettings: [.linkedLibrary("systemd")]),
        // GLib through pkg-config: GChecksum (SHA-1, the implementation QEMU's glib crypto backend uses).
        .systemLibrary(
            name: "CGLib", pkgConfig: "glib-2.0",
            providers: [.apt(["libglib2.0-dev"])]),
        // Pure core: codecs, state machines, endpoints, back-off. No I/O.
        .target(name: "KVMIBrokerCore", dependencies: ["CGLib"]),
        // Thin OS layer: descriptors, sockets, the epoll reactor, the handshake engine.
        .target(
            name: "KVMIBrokerOS",
            dependencies: [
                "KVMIBrokerCore", "CKVMIBroker",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]),
        // The allow-policy: GKeyFile drop-in directories, semantics, check/explain/dump. Pure apart from reading files.
        .target(name: "KVMIBrokerPolicy", dependencies: ["KVMIBrokerCore", "CGLib"]),
        // libvirt through pkg-config: the public headers and a few getters Swift 6 needs.
        .systemLibrary(
            name: "CLibvirt", pkgConfig: "libvirt",
            providers: [.apt(["libvirt-dev"])]),
        // libvirt layer: discovery (events, keepalive, reconnect + resync), our metadata, enrolment, QEMU pids.
        .target(
            name: "KVMIBrokerLibvirt",
            dependencies: [
                "KVMIBrokerCore", "CLibvirt",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Daemon layer: the QEMU channel server, sessions, identity checks, service notification, journal logging.
        .target(
            name: "KVMIBrokerDaemon",
            dependencies: [
                "KVMIBrokerCore", "KVMIBrokerOS", "KVMIBrokerPolicy", "KVMIBrokerLibvirt", "CKVMIBroker",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]),
        // The test introspector: the tool side of the handshake as libkvmi does it, plus misbehaviours.
        .target(name: "KVMITestIntrospector", dependencies: ["KVMIBrokerCore", "KVMIBrokerOS", "CKVMIBroker"]),
        .executableTarget(
            name: "kvmi-broker",
            dependencies: [
                "KVMIBrokerCore", "KVMIBrokerOS", "KVMIBrokerDaemon", "KVMIBrokerPolicy", "KVMIBrokerLibvirt",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]),
        .executableTarget(
            name: "kvmi-test-introspector",
            dependencies: [
                "KVMITestIntrospector", "KVMIBrokerCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .executableTarget(
            name: "kvmi-bench",
            dependencies: [
                "KVMIBrokerCore", "KVMIBrokerOS", "KVMIBrokerDaemon", "KVMIBrokerPolicy", "KVMITestIntrospector",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(name: "KVMIBrokerCoreTests", dependencies: ["KVMIBrokerCore"]),
        // The benchmark's own arithmetic (the series summary it prints): no storm is run.
        .testTarget(name: "KVMIBenchTests", dependencies: ["kvmi-bench"]),
        .testTarget(
            name: "KVMIBrokerLibvirtTests",
            dependencies: ["KVMIBrokerLibvirt", "KVMIBrokerCore", "CLibvirt", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "KVMIBrokerPolicyTests", dependencies: ["KVMIBrokerPolicy", "KVMIBrokerCore"], resources: [.copy("Corpus")]),
        .testTarget(
            name: "KVMIBrokerOSTests",
            dependencies: [
                "KVMIBrokerCore", "KVMIBrokerOS", "KVMIBrokerDaemon", "KVMIBrokerPolicy", "KVMIBrokerLibvirt", "KVMITestIntrospector",
                "CKVMIBroker", .product(name: "Logging", package: "swift-log"),
            ],
            // Peer programs the tests run as separate processes (found through #filePath).
            exclude: ["Fixtures"]),
    ]
)
