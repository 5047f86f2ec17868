//! The sandbox's seccomp filter: a denylist approximating Docker's default profile, compiled to classic BPF here.
//!
//! [`RULES`] is the whole policy, one line per system call. [`program`] turns it into a straight-line BPF program:
//! check the architecture (anything but x86_64 kills the process, so that another ABI's numbers cannot slip past),
//! refuse x32 system calls, then one small block per rule that either returns the rule's errno or, for rules that
//! look at an argument, decides between errno and allow; whatever no rule names is allowed. [`install`] loads it into
//! the boot process, whose descendants (the agent and everything it runs) inherit it. The agent itself needs nothing
//! on the list, so the filter goes in before the agent starts and is never relaxed.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::io;

use super::{BootError, Step};

/// One instruction of a classic BPF program.
type Insn = libc::sock_filter;

// Classic BPF opcodes used here (linux/bpf_common.h), spelled out as in the kernel's headers.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

// Offsets into `struct seccomp_data`: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// Offset of the low 32 bits of argument `arg` (x86_64 is little-endian).
const fn data_arg_low(arg: u8) -> u32 {
    16 + 8 * arg as u32
}

/// `AUDIT_ARCH_X86_64` from linux/audit.h: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// x32 system calls are x86_64 numbers with this bit set; Docker refuses them too.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL_PROCESS: u32 = libc::SECCOMP_RET_KILL_PROCESS;
const fn ret_errno(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

/// When a rule refuses its system call.
#[derive(Debug, Clone, Copy)]
pub enum When {
    /// Always.
    Always,
    /// When the low 32 bits of argument `arg` have any bit of `mask` set.
    ArgHasAnyOf { arg: u8, mask: u32 },
    /// When the low 32 bits of argument `arg` are none of `values`.
    ArgNotOneOf { arg: u8, values: &'static [u32] },
}

/// One system call the filter refuses, and with which errno.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub name: &'static str,
    pub nr: u32,
    pub when: When,
    pub errno: i32,
}

const fn deny(name: &'static str, nr: libc::c_long) -> Rule {
    Rule {
        name,
        nr: nr as u32,
        when: When::Always,
        errno: libc::EPERM,
    }
}

/// Namespace flags that `clone` may not use. `CLONE_NEWTIME` shares its bit with `clone`'s exit-signal byte, so it is
/// only checked for `unshare` (the kernel refuses it in `clone` anyway).
const CLONE_NAMESPACES: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP) as u32;
const UNSHARE_NAMESPACES: u32 = CLONE_NAMESPACES | libc::CLONE_NEWTIME as u32;

/// Personalities Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and the query 0xffffffff.
const ALLOWED_PERSONALITIES: &[u32] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The policy. Every system call not listed here is allowed.
#[cfg(target_arch = "x86_64")]
pub const RULES: &[Rule] = &[
    // Kernel code, modules and raw hardware.
    deny("kexec_load", libc::SYS_kexec_load),
    deny("kexec_file_load", libc::SYS_kexec_file_load),
    deny("init_module", libc::SYS_init_module),
    deny("finit_module", libc::SYS_finit_module),
    deny("delete_module", libc::SYS_delete_module),
    deny("create_module", 174),
    deny("get_kernel_syms", 177),
    deny("query_module", 178),
    deny("iopl", libc::SYS_iopl),
    deny("ioperm", libc::SYS_ioperm),
    deny("uselib", libc::SYS_uselib),
    deny("nfsservctl", libc::SYS_nfsservctl),
    deny("lookup_dcookie", libc::SYS_lookup_dcookie),
    deny("bpf", libc::SYS_bpf),
    deny("perf_event_open", libc::SYS_perf_event_open),
    deny("userfaultfd", libc::SYS_userfaultfd),
    // The whole machine: power, swap, clock, kernel log, accounting, quotas, terminals.
    deny("reboot", libc::SYS_reboot),
    deny("swapon", libc::SYS_swapon),
    deny("swapoff", libc::SYS_swapoff),
    deny("settimeofday", libc::SYS_settimeofday),
    deny("clock_settime", libc::SYS_clock_settime),
    deny("clock_adjtime", libc::SYS_clock_adjtime),
    deny("adjtimex", libc::SYS_adjtimex),
    deny("syslog", libc::SYS_syslog),
    deny("acct", libc::SYS_acct),
    deny("quotactl", libc::SYS_quotactl),
    deny("vhangup", libc::SYS_vhangup),
    // Kernel keyrings are not namespaced.
    deny("keyctl", libc::SYS_keyctl),
    deny("add_key", libc::SYS_add_key),
    deny("request_key", libc::SYS_request_key),
    // Other processes' memory and file descriptors.
    deny("ptrace", libc::SYS_ptrace),
    deny("process_vm_readv", libc::SYS_process_vm_readv),
    deny("process_vm_writev", libc::SYS_process_vm_writev),
    deny("pidfd_getfd", libc::SYS_pidfd_getfd),
    // File handles bypass path-based confinement.
    deny("open_by_handle_at", libc::SYS_open_by_handle_at),
    deny("name_to_handle_at", libc::SYS_name_to_handle_at),
    // Mounts, both APIs, and namespaces. (chroot stays allowed, as in Docker, since CAP_SYS_CHROOT is kept.)
    deny("mount", libc::SYS_mount),
    deny("umount2", libc::SYS_umount2),
    deny("pivot_root", libc::SYS_pivot_root),
    deny("open_tree", libc::SYS_open_tree),
    deny("move_mount", libc::SYS_move_mount),
    deny("fsopen", libc::SYS_fsopen),
    deny("fsconfig", libc::SYS_fsconfig),
    deny("fsmount", libc::SYS_fsmount),
    deny("fspick", libc::SYS_fspick),
    deny("mount_setattr", libc::SYS_mount_setattr),
    deny("setns", libc::SYS_setns),
    Rule {
        name: "unshare",
        nr: libc::SYS_unshare as u32,
        when: When::ArgHasAnyOf {
            arg: 0,
            mask: UNSHARE_NAMESPACES,
        },
        errno: libc::EPERM,
    },
    Rule {
        name: "clone",
        nr: libc::SYS_clone as u32,
        when: When::ArgHasAnyOf {
            arg: 0,
            mask: CLONE_NAMESPACES,
        },
        errno: libc::EPERM,
    },
    // clone3 passes its flags in memory, which a filter cannot read; ENOSYS makes libc fall back to clone.
    Rule {
        name: "clone3",
        nr: libc::SYS_clone3 as u32,
        when: When::Always,
        errno: libc::ENOSYS,
    },
    // io_uring bypasses this filter (its operations are not system calls) and has been a repeated source of kernel
    // escapes; Docker and containerd refuse it too. ENOSYS makes programs fall back to ordinary I/O.
    Rule {
        name: "io_uring_setup",
        nr: libc::SYS_io_uring_setup as u32,
        when: When::Always,
        errno: libc::ENOSYS,
    },
    Rule {
        name: "io_uring_enter",
        nr: libc::SYS_io_uring_enter as u32,
        when: When::Always,
        errno: libc::ENOSYS,
    },
    Rule {
        name: "io_uring_register",
        nr: libc::SYS_io_uring_register as u32,
        when: When::Always,
        errno: libc::ENOSYS,
    },
    Rule {
        name: "personality",
        nr: libc::SYS_personality as u32,
        when: When::ArgNotOneOf {
            arg: 0,
            values: ALLOWED_PERSONALITIES,
        },
        errno: libc::EPERM,
    },
];

/// Loads the filter into this process. Needs `no_new_privs` or CAP_SYS_ADMIN.
#[cfg(target_arch = "x86_64")]
pub fn install() -> Result<(), BootError> {
    let step = || "installing the seccomp filter";
    let program = program(RULES).step(step)?;
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::other("the program is too long"))
        .step(step)?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel copies the program and writes nothing.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if ret != 0 {
        return Err(BootError::new(step(), io::Error::last_os_error()));
    }
    Ok(())
}

/// Only the x86_64 policy exists; refusing to boot beats running unfiltered.
#[cfg(not(target_arch = "x86_64"))]
pub fn install() -> Result<(), BootError> {
    Err(BootError::new(
        "installing the seccomp filter",
        io::Error::new(io::ErrorKind::Unsupported, "the filter is only written for x86_64"),
    ))
}

/// Compiles `rules` to a BPF program for x86_64.
pub fn program(rules: &[Rule]) -> io::Result<Vec<Insn>> {
    let mut prog = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0)?,
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1)?,
        stmt(RET_K, ret_errno(libc::EPERM)),
    ];
    // Between blocks the accumulator holds the system call number: a block that loads an argument always returns.
    for rule in rules {
        let deny = ret_errno(rule.errno);
        let jump = |code, k, jt, jf| {
            jump(code, k, jt, jf).map_err(|err| io::Error::other(format!("the rule for {}: {err}", rule.name)))
        };
        match rule.when {
            When::Always => {
                prog.push(jump(JEQ_K, rule.nr, 0, 1)?);
                prog.push(stmt(RET_K, deny));
            }
            When::ArgHasAnyOf { arg, mask } => {
                prog.push(jump(JEQ_K, rule.nr, 0, 4)?);
                prog.push(stmt(LD_W_ABS, data_arg_low(arg)));
                prog.push(jump(JSET_K, mask, 1, 0)?);
                prog.push(stmt(RET_K, RET_ALLOW));
                prog.push(stmt(RET_K, deny));
            }
            When::ArgNotOneOf { arg, values } => {
                let n = values.len();
                prog.push(jump(JEQ_K, rule.nr, 0, n + 3)?);
                prog.push(stmt(LD_W_ABS, data_arg_low(arg)));
                for (i, &value) in values.iter().enumerate() {
                    // A match jumps over the remaining comparisons and the deny, to the allow.
                    prog.push(jump(JEQ_K, value, n - i, 0)?);
                }
                prog.push(stmt(RET_K, deny));
                prog.push(stmt(RET_K, RET_ALLOW));
            }
        }
    }
    prog.push(stmt(RET_K, RET_ALLOW));
    Ok(prog)
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: usize, jf: usize) -> io::Result<Insn> {
    let offset = |off: usize| u8::try_from(off).map_err(|_| io::Error::other(format!("jump of {off} is too far")));
    Ok(Insn {
        code,
        jt: offset(jt)?,
        jf: offset(jf)?,
        k,
    })
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Runs `prog` on a `seccomp_data` the way the kernel does; panics on anything a correct program never does.
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = prog[pc];
            pc += 1;
            let taken = match insn.code {
                LD_W_ABS => {
                    let at = insn.k as usize;
                    acc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                    continue;
                }
                RET_K => return insn.k,
                JEQ_K => acc == insn.k,
                JGE_K => acc >= insn.k,
                JSET_K => acc & insn.k != 0,
                code => panic!("unexpected opcode {code:#x}"),
            };
            pc += usize::from(if taken { insn.jt } else { insn.jf });
            assert!(pc < prog.len(), "jump past the end");
        }
    }

    fn x86(nr: libc::c_long, arg0: u64) -> u32 {
        run(
            &program(RULES).unwrap(),
            AUDIT_ARCH_X86_64,
            nr as u32,
            [arg0, 0, 0, 0, 0, 0],
        )
    }

    const EPERM: u32 = ret_errno(libc::EPERM);

    #[test]
    fn every_listed_syscall_is_refused() {
        let listed = [
            "kexec_load",
            "kexec_file_load",
            "open_by_handle_at",
            "name_to_handle_at",
            "init_module",
            "finit_module",
            "delete_module",
            "iopl",
            "ioperm",
            "swapon",
            "swapoff",
            "reboot",
            "mount",
            "umount2",
            "pivot_root",
            "setns",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "acct",
            "quotactl",
            "lookup_dcookie",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "syslog",
            "vhangup",
            "uselib",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "pidfd_getfd",
            "unshare",
            "clone",
            "clone3",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "personality",
        ];
        for name in listed {
            assert!(RULES.iter().any(|rule| rule.name == name), "{name} is not in the table");
        }
        let prog = program(RULES).unwrap();
        for rule in RULES.iter().filter(|rule| matches!(rule.when, When::Always)) {
            let got = run(&prog, AUDIT_ARCH_X86_64, rule.nr, [0; 6]);
            assert_eq!(got, ret_errno(rule.errno), "{}", rule.name);
        }
    }

    #[test]
    fn each_syscall_has_one_rule() {
        for (i, rule) in RULES.iter().enumerate() {
            assert!(
                RULES[i + 1..].iter().all(|other| other.nr != rule.nr),
                "{} twice",
                rule.name
            );
        }
    }

    #[test]
    fn the_program_has_the_expected_shape() {
        let prog = program(RULES).unwrap();
        let expected = 6
            + RULES
                .iter()
                .map(|rule| match rule.when {
                    When::Always => 2,
                    When::ArgHasAnyOf { .. } => 5,
                    When::ArgNotOneOf { values, .. } => values.len() + 4,
                })
                .sum::<usize>()
            + 1;
        assert_eq!(prog.len(), expected);
        assert!(prog.len() <= 4096, "BPF_MAXINSNS");
        assert_eq!(prog[0].code, LD_W_ABS);
        assert_eq!(prog[0].k, DATA_ARCH);
        assert_eq!((prog[prog.len() - 1].code, prog[prog.len() - 1].k), (RET_K, RET_ALLOW));
        for (pc, insn) in prog.iter().enumerate() {
            if insn.code & 0x07 == 0x05 {
                assert!(
                    pc + 1 + usize::from(insn.jt.max(insn.jf)) < prog.len(),
                    "jump at {pc} leaves the program"
                );
            }
        }
    }

    #[test]
    fn other_architectures_are_killed() {
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        let prog = program(RULES).unwrap();
        assert_eq!(
            run(&prog, AUDIT_ARCH_I386, libc::SYS_read as u32, [0; 6]),
            RET_KILL_PROCESS
        );
    }

    #[test]
    fn x32_syscalls_are_refused() {
        let prog = program(RULES).unwrap();
        assert_eq!(
            run(
                &prog,
                AUDIT_ARCH_X86_64,
                X32_SYSCALL_BIT | libc::SYS_read as u32,
                [0; 6]
            ),
            EPERM
        );
    }

    #[test]
    fn what_the_agent_needs_is_allowed() {
        for nr in [
            libc::SYS_read,
            libc::SYS_execve,
            libc::SYS_wait4,
            libc::SYS_setuid,
            libc::SYS_setgroups,
            libc::SYS_accept4,
            libc::SYS_epoll_wait,
            libc::SYS_pipe2,
            libc::SYS_dup2,
            libc::SYS_kill,
            libc::SYS_prctl,
            libc::SYS_ioctl,
            libc::SYS_openat,
            libc::SYS_chroot,
            libc::SYS_unshare,
        ] {
            assert_eq!(x86(nr, 0), RET_ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn clone_and_unshare_may_not_create_namespaces() {
        let thread =
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
        assert_eq!(x86(libc::SYS_clone, thread), RET_ALLOW);
        assert_eq!(x86(libc::SYS_clone, libc::SIGCHLD as u64), RET_ALLOW);
        // Only the low 32 bits count, as in the kernel.
        assert_eq!(x86(libc::SYS_clone, (1 << 40) | libc::SIGCHLD as u64), RET_ALLOW);
        for flag in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWCGROUP,
        ] {
            assert_eq!(
                x86(libc::SYS_clone, (flag | libc::SIGCHLD) as u64),
                EPERM,
                "clone {flag:#x}"
            );
            assert_eq!(x86(libc::SYS_unshare, flag as u64), EPERM, "unshare {flag:#x}");
        }
        assert_eq!(x86(libc::SYS_unshare, libc::CLONE_NEWTIME as u64), EPERM);
        assert_eq!(x86(libc::SYS_unshare, libc::CLONE_FS as u64), RET_ALLOW);
        assert_eq!(x86(libc::SYS_clone3, 0), ret_errno(libc::ENOSYS));
    }

    #[test]
    fn personality_is_limited_to_dockers_values() {
        for allowed in ALLOWED_PERSONALITIES {
            assert_eq!(
                x86(libc::SYS_personality, u64::from(*allowed)),
                RET_ALLOW,
                "{allowed:#x}"
            );
        }
        for refused in [0x1u64, 0x0040_0000 /* ADDR_NO_RANDOMIZE */, 0x10] {
            assert_eq!(x86(libc::SYS_personality, refused), EPERM, "{refused:#x}");
        }
    }

    #[test]
    fn jumps_too_far_are_errors() {
        assert!(jump(JEQ_K, 0, 256, 0).is_err());
        assert!(jump(JEQ_K, 0, 0, 255).is_ok());
    }
}
