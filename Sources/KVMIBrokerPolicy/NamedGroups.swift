import KVMIBrokerCore

/// The command and event groups the project ships, per ABI generation. A group is written
/// `@name` in `Commands=` and `Events=`; groups add up (`Commands=@read-only-monitoring;@page-tracking`).
public enum PolicyGroups {
    /// Group names, in the order documentation lists them.
    public static let names = ["@read-only-monitoring", "@page-tracking", "@full-control"]

    /// The commands of `group` for `abi`, or nil when there is no such group.
    public static func commands(_ group: String, _ abi: ABIGeneration) -> [String]? {
        switch (group, abi) {
        case ("@read-only-monitoring", .v12):
            return [
                "VM_GET_INFO", "VM_CONTROL_EVENTS", "VM_READ_PHYSICAL", "VM_PAUSE_VCPU", "VCPU_GET_INFO", "VCPU_CONTROL_EVENTS",
                "VCPU_GET_REGISTERS", "VCPU_GET_CPUID", "VCPU_GET_XCR", "VCPU_GET_XSAVE", "VCPU_GET_MTRR_TYPE", "VCPU_TRANSLATE_GVA",
            ]
        case ("@read-only-monitoring", .v7):
            return [
                "VM_GET_INFO", "VM_CONTROL_EVENTS", "VM_READ_PHYSICAL", "VM_QUERY_PHYSICAL", "VM_GET_MAX_GFN", "VCPU_PAUSE",
                "VCPU_GET_INFO", "VCPU_CONTROL_EVENTS", "VCPU_GET_REGISTERS", "VCPU_GET_CPUID", "VCPU_GET_XCR", "VCPU_GET_XSAVE",
                "VCPU_GET_MTRR_TYPE", "VCPU_TRANSLATE_GVA", "VCPU_GET_EPT_VIEW",
            ]
        case ("@page-tracking", .v12):
            return ["VM_SET_PAGE_ACCESS"]
        case ("@page-tracking", .v7):
            return ["VM_GET_PAGE_ACCESS", "VM_SET_PAGE_ACCESS", "VM_SET_PAGE_WRITE_BITMAP"]
        case ("@full-control", _):
            return KVMINames.commands(abi).sorted { $0.value < $1.value }.map(\.key)
        default:
            return nil
        }
    }

    /// The events of `group` for `abi`, or nil when there is no such group.
    public static func events(_ group: String, _ abi: ABIGeneration) -> [String]? {
        switch (group, abi) {
        case ("@read-only-monitoring", .v12): return ["UNHOOK", "PAUSE"]
        case ("@read-only-monitoring", .v7): return ["UNHOOK", "PAUSE_VCPU", "CREATE_VCPU"]
        case ("@page-tracking", _): return ["PF"]
        case ("@full-control", _): return KVMINames.events(abi).sorted { $0.value < $1.value }.map(\.key)
        default: return nil
        }
    }
}

/// Which list a name belongs to.
enum NameKind: String {
    case command, event

    func table(_ abi: ABIGeneration) -> [String: Int32] {
        self == .command ? KVMINames.commands(abi) : KVMINames.events(abi)
    }

    func group(_ name: String, _ abi: ABIGeneration) -> [String]? {
        self == .command ? PolicyGroups.commands(name, abi) : PolicyGroups.events(name, abi)
    }

    /// The table's name and id for `name` (normalized) in `abi`, libkvmi spellings included.
    func lookup(_ name: String, _ abi: ABIGeneration) -> (name: String, id: Int32)? {
        switch self {
        case .command:
            guard let canonical = KVMINames.commandName(name, abi), let id = KVMINames.commands(abi)[canonical] else { return nil }
            return (canonical, id)
        case .event:
            return KVMINames.events(abi)[name].map { (name, $0) }
        }
    }

    /// The ids a policy may give by number for `abi`.
    func numericRange(_ abi: ABIGeneration) -> ClosedRange<Int32> {
        self == .command ? KVMINames.commandIDs(abi) : KVMINames.eventIDs(abi)
    }

    /// The name `abi`'s table gives `id`, if any.
    func name(of id: Int32, _ abi: ABIGeneration) -> String? {
        table(abi).first { $0.value == id }?.key
    }
}

/// A bare decimal id (`25`) in `Commands=` or `Events=`: at most three digits.
func numericID(_ item: String) -> Int32? {
    guard (1...3).contains(item.utf8.count), item.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { return nil }
    return Int32(item)
}

/// Accepts `VM_GET_INFO`, `vm_get_info` and `KVMI_VM_GET_INFO`; events also `KVMI_EVENT_PF`.
func normalizedName(_ text: String, _ kind: NameKind) -> String {
    var name = text.uppercased()
    for prefix in (kind == .event ? ["KVMI_VM_EVENT_", "KVMI_EVENT_", "KVMI_"] : ["KVMI_"]) where name.hasPrefix(prefix) {
        name.removeFirst(prefix.count)
        break
    }
    return name
}

/// Levenshtein distance, for "did you mean" suggestions.
func editDistance(_ a: String, _ b: String) -> Int {
    let x = Array(a.utf8)
    let y = Array(b.utf8)
    if x.isEmpty { return y.count }
    if y.isEmpty { return x.count }
    var previous = Array(0...y.count)
    var current = [Int](repeating: 0, count: y.count + 1)
    for i in 1...x.count {
        current[0] = i
        for j in 1...y.count {
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x[i - 1] == y[j - 1] ? 0 : 1))
        }
        swap(&previous, &current)
    }
    return previous[y.count]
}

/// The closest candidate, if it is close enough to be a plausible typo.
func closest(to text: String, among candidates: some Sequence<String>) -> String? {
    var best: (name: String, distance: Int)?
    for candidate in candidates {
        let distance = editDistance(text.uppercased(), candidate.uppercased())
        if best == nil || distance < best!.distance || (distance == best!.distance && candidate < best!.name) {
            best = (candidate, distance)
        }
    }
    guard let best, best.distance <= max(2, text.count / 3) else { return nil }
    return best.name
}

func didYouMean(_ suggestion: String?) -> String { suggestion.map { "; did you mean '\($0)'?" } ?? "" }
