/// KVMI command and event names and their ids per ABI generation. Policy files use names;
/// the broker maps them per generation and refuses names a generation does not have.
///
/// Sources (Documentation/policy.md section 2.4 lists them per table):
/// - v12: the last upstream posting, KVM-VMI/kvm `include/uapi/linux/kvmi.h` of kvmi-v12
///   (`KVMI_VM_MESSAGE_ID(n) = n<<1`, `KVMI_VCPU_MESSAGE_ID(n) = n<<1|1`).
/// - v7: the union of the KVM-VMI/kvm kvmi-v7 kernel's `include/uapi/linux/kvmi.h` (its
///   `VM_`/`VCPU_` names) and libkvmi master's `include/linux/kvmi.h` (bc80de9, 2023), which kept
///   growing after the kernel header: ids 12, 20, 25, 31, 39, 41-44 are named only there. Those
///   get libkvmi's name with the `VM_`/`VCPU_` prefix its `kvmi.c` scope implies (a `kvmi_vcpu_hdr`
///   in the request: `VCPU_`). libkvmi's own spellings are accepted too (`v7Aliases`).
public enum KVMINames {
    public static func commands(_ abi: ABIGeneration) -> [String: Int32] {
        switch abi {
        case .v12: return v12Commands
        case .v7: return v7Commands
        }
    }

    public static func events(_ abi: ABIGeneration) -> [String: Int32] {
        switch abi {
        case .v12: return v12Events
        case .v7: return v7Events
        }
    }

    /// The commands the kernel always allows (they cannot be revoked one by one).
    public static let alwaysAllowed = ["GET_VERSION", "VM_CHECK_COMMAND", "VM_CHECK_EVENT"]

    static let v12Commands: [String: Int32] = [
        "GET_VERSION": 2, "VM_CHECK_COMMAND": 4, "VM_CHECK_EVENT": 6, "VM_GET_INFO": 8, "VM_CONTROL_EVENTS": 10,
        "VM_READ_PHYSICAL": 12, "VM_WRITE_PHYSICAL": 14, "VM_PAUSE_VCPU": 16, "VM_CONTROL_CLEANUP": 18, "VM_SET_PAGE_ACCESS": 20,
        "VCPU_GET_INFO": 3, "VCPU_CONTROL_EVENTS": 5, "VCPU_GET_REGISTERS": 7, "VCPU_SET_REGISTERS": 9, "VCPU_GET_CPUID": 11,
        "VCPU_CONTROL_CR": 13, "VCPU_INJECT_EXCEPTION": 15, "VCPU_GET_XCR": 17, "VCPU_GET_XSAVE": 19, "VCPU_SET_XSAVE": 21,
        "VCPU_GET_MTRR_TYPE": 23, "VCPU_CONTROL_MSR": 25, "VCPU_CONTROL_SINGLESTEP": 27, "VCPU_TRANSLATE_GVA": 29,
    ]

    static let v12Events: [String: Int32] = [
        "UNHOOK": 0, "PAUSE": 1, "HYPERCALL": 3, "BREAKPOINT": 5, "CR": 7, "TRAP": 9, "XSETBV": 11, "DESCRIPTOR": 13, "MSR": 15,
        "PF": 17, "SINGLESTEP": 19,
    ]

    static let v7Commands: [String: Int32] = [
        "GET_VERSION": 2, "VM_CHECK_COMMAND": 3, "VM_CHECK_EVENT": 4, "VM_GET_INFO": 5, "VCPU_GET_INFO": 6, "VCPU_PAUSE": 7,
        "VM_CONTROL_EVENTS": 8, "VCPU_CONTROL_EVENTS": 9, "VCPU_CONTROL_CR": 10, "VCPU_CONTROL_MSR": 11, "VCPU_CONTROL_VE": 12,
        "VCPU_GET_REGISTERS": 13, "VCPU_SET_REGISTERS": 14, "VCPU_GET_CPUID": 15, "VCPU_GET_XSAVE": 16, "VM_READ_PHYSICAL": 17,
        "VM_WRITE_PHYSICAL": 18, "VCPU_INJECT_EXCEPTION": 19, "VM_GET_PAGE_ACCESS": 20, "VM_SET_PAGE_ACCESS": 21, "VM_GET_MAP_TOKEN": 22,
        "VCPU_GET_MTRR_TYPE": 23, "VM_CONTROL_SPP": 24, "VM_GET_PAGE_WRITE_BITMAP": 25, "VM_SET_PAGE_WRITE_BITMAP": 26,
        "VM_CONTROL_CMD_RESPONSE": 27, "VCPU_SET_VE_INFO": 28, "VM_GET_MAX_GFN": 29, "VM_SET_PAGE_SVE": 30, "VM_GET_NEXT_AVAILABLE_GFN": 31,
        "VCPU_SET_EPT_VIEW": 32, "VCPU_DISABLE_VE": 33, "VCPU_GET_EPT_VIEW": 34, "VCPU_TRANSLATE_GVA": 35, "VCPU_CONTROL_EPT_VIEW": 36,
        "VCPU_GET_XCR": 37, "VCPU_SET_XSAVE": 38, "VM_QUERY_PHYSICAL": 39, "VCPU_ALLOC_GFN": 41, "VCPU_FREE_GFN": 42,
        "VM_CREATE_EPT_VIEW": 43, "VM_DESTROY_EPT_VIEW": 44, "VCPU_CHANGE_GFN": 60, "VCPU_CONTROL_SINGLESTEP": 63,
    ]

    /// Other spellings of v7 commands, to the table's name: libkvmi master's (`GET_GUEST_INFO`,
    /// `SWITCH_EPT_VIEW`, ...) and the names earlier versions of this table used for 31, 41, 42.
    static let v7Aliases: [String: String] = [
        "CHECK_COMMAND": "VM_CHECK_COMMAND", "CHECK_EVENT": "VM_CHECK_EVENT", "GET_GUEST_INFO": "VM_GET_INFO", "GET_VCPU_INFO": "VCPU_GET_INFO",
        "PAUSE_VCPU": "VCPU_PAUSE", "CONTROL_VM_EVENTS": "VM_CONTROL_EVENTS", "CONTROL_EVENTS": "VCPU_CONTROL_EVENTS",
        "CONTROL_CR": "VCPU_CONTROL_CR", "CONTROL_MSR": "VCPU_CONTROL_MSR", "CONTROL_VE": "VCPU_CONTROL_VE", "GET_REGISTERS": "VCPU_GET_REGISTERS",
        "SET_REGISTERS": "VCPU_SET_REGISTERS", "GET_CPUID": "VCPU_GET_CPUID", "GET_XSAVE": "VCPU_GET_XSAVE", "READ_PHYSICAL": "VM_READ_PHYSICAL",
        "WRITE_PHYSICAL": "VM_WRITE_PHYSICAL", "INJECT_EXCEPTION": "VCPU_INJECT_EXCEPTION", "GET_PAGE_ACCESS": "VM_GET_PAGE_ACCESS",
        "SET_PAGE_ACCESS": "VM_SET_PAGE_ACCESS", "GET_MAP_TOKEN": "VM_GET_MAP_TOKEN", "GET_MTRR_TYPE": "VCPU_GET_MTRR_TYPE",
        "CONTROL_SPP": "VM_CONTROL_SPP", "GET_PAGE_WRITE_BITMAP": "VM_GET_PAGE_WRITE_BITMAP", "SET_PAGE_WRITE_BITMAP": "VM_SET_PAGE_WRITE_BITMAP",
        "CONTROL_CMD_RESPONSE": "VM_CONTROL_CMD_RESPONSE", "SET_VE_INFO_PAGE": "VCPU_SET_VE_INFO", "GET_MAX_GFN": "VM_GET_MAX_GFN",
        "GET_NEXT_AVAILABLE_GFN": "VM_GET_NEXT_AVAILABLE_GFN", "SWITCH_EPT_VIEW": "VCPU_SET_EPT_VIEW", "DISABLE_VE": "VCPU_DISABLE_VE",
        "GET_EPT_VIEW": "VCPU_GET_EPT_VIEW", "QUERY_PHYSICAL": "VM_QUERY_PHYSICAL", "CREATE_EPT_VIEW": "VM_CREATE_EPT_VIEW",
        "DESTROY_EPT_VIEW": "VM_DESTROY_EPT_VIEW",
        "VM_ALLOC_GFN": "VCPU_ALLOC_GFN", "VM_FREE_GFN": "VCPU_FREE_GFN", "VCPU_GET_NEXT_AVAILABLE_GFN": "VM_GET_NEXT_AVAILABLE_GFN",
    ]

    /// The table's name for `name` (already upper case, without `KVMI_`) in `abi`: itself, or
    /// what a libkvmi spelling stands for; nil when the generation has no such command.
    public static func commandName(_ name: String, _ abi: ABIGeneration) -> String? {
        if commands(abi)[name] != nil { return name }
        if abi == .v7, let canonical = v7Aliases[name] { return canonical }
        return nil
    }

    /// The ids the COMMAND ioctl accepts that a policy may list by number: above the two
    /// carriers (0 and 1) and below the kernel's KVMI_NUM_COMMANDS (v12: 30; v7: KVMI_NUM_MESSAGES, 64).
    public static func commandIDs(_ abi: ABIGeneration) -> ClosedRange<Int32> { abi == .v12 ? 2...29 : 2...63 }

    /// The event ids below the kernel's KVMI_NUM_EVENTS (v12: 20; v7: 14).
    public static func eventIDs(_ abi: ABIGeneration) -> ClosedRange<Int32> { abi == .v12 ? 0...19 : 0...13 }

    static let v7Events: [String: Int32] = [
        "UNHOOK": 0, "CR": 1, "MSR": 2, "XSETBV": 3, "BREAKPOINT": 4, "HYPERCALL": 5, "PF": 6, "TRAP": 7, "DESCRIPTOR": 8,
        "CREATE_VCPU": 9, "PAUSE_VCPU": 10, "SINGLESTEP": 11, "CMD_ERROR": 12, "CPUID": 13,
    ]
}

/// The VM-level KVMI messages a tool sends first, and the replies and UNHOOK event it reads,
/// per generation (Documentation/kernel-double.md section 4). Host byte order.
public enum KVMIWire {
    public static let headerSize = 8
    public static let maximumMessageSize = 8184

    public struct Header: Sendable, Equatable {
        public var id: UInt16
        public var size: UInt16
        public var seq: UInt32

        public init(id: UInt16, size: UInt16, seq: UInt32) {
            self.id = id
            self.size = size
            self.seq = seq
        }

        public init(_ bytes: some Collection<UInt8>) {
            let array = Array(bytes)
            id = array.read(UInt16.self, at: 0, order: .host)
            size = array.read(UInt16.self, at: 2, order: .host)
            seq = array.read(UInt32.self, at: 4, order: .host)
        }
    }

    public static func message(id: Int32, seq: UInt32, body: [UInt8] = []) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(UInt16(id), order: .host)
        bytes.append(UInt16(body.count), order: .host)
        bytes.append(seq, order: .host)
        return bytes + body
    }

    /// `{u16 id; u16 padding1; u32 padding2}`, the body of VM_CHECK_COMMAND and VM_CHECK_EVENT.
    public static func checkBody(_ id: Int32) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(UInt16(id), order: .host)
        bytes += [0, 0, 0, 0, 0, 0]
        return bytes
    }

    /// `{u16 event_id; u8 enable; u8 padding1; u32 padding2}`, the body of VM_CONTROL_EVENTS.
    public static func controlEventsBody(event: Int32, enable: Bool) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(UInt16(event), order: .host)
        bytes += [enable ? 1 : 0, 0, 0, 0, 0, 0]
        return bytes
    }

    /// The message id that carries events from the kernel to the tool.
    public static func eventCarrier(_ abi: ABIGeneration) -> UInt16 { abi == .v12 ? 0 : 1 }

    /// The event number inside an event message's body (v12: kvmi_event_hdr.event at 0; v7: kvmi_event.event at 4).
    public static func eventNumber(_ abi: ABIGeneration, body: [UInt8]) -> UInt8? {
        switch abi {
        case .v12: return body.count >= 2 ? body[0] : nil
        case .v7: return body.count >= 5 ? body[4] : nil
        }
    }
}
