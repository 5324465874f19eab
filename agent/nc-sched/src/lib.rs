//! `nc` as libcontainer calls it: `sched_attr_t` and `sched_setattr`, with
//! nc's types and signatures, through libc's `syscall` instead of nc's
//! own inline assembly (which cannot be built as Thumb-2 code: it names
//! `r7`, Thumb's frame pointer). A dependant that needs more of nc fails to
//! compile rather than behaving differently.

#![allow(non_camel_case_types)]

/// nc's error type: the raw `errno` value.
pub type Errno = i32;

/// `pid_t`, as nc names it.
pub type pid_t = i32;

/// `struct sched_attr` of `<linux/sched/types.h>`, field for field
/// (`SCHED_ATTR_SIZE_VER1`, 56 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct sched_attr_t {
    pub size: u32,
    pub sched_policy: u32,
    pub sched_flags: u64,
    /// `SCHED_NORMAL`, `SCHED_BATCH`
    pub sched_nice: i32,
    /// `SCHED_FIFO`, `SCHED_RR`
    pub sched_priority: u32,
    /// `SCHED_DEADLINE`
    pub sched_runtime: u64,
    pub sched_deadline: u64,
    pub sched_period: u64,
    /// Utilisation hints.
    pub sched_util_min: u32,
    pub sched_util_max: u32,
}

/// `sched_setattr(2)` for thread `pid` (0: the calling thread).
///
/// # Safety
/// Only as unsafe as nc declares it: `attr` is a valid reference and the
/// kernel reads at most `attr.size` bytes of it.
pub unsafe fn sched_setattr(pid: pid_t, attr: &sched_attr_t, flags: u32) -> Result<(), Errno> {
    // SAFETY: the pointer comes from a live reference to a `repr(C)`
    // struct laid out as the kernel's; the kernel only reads it.
    let r = unsafe {
        libc::syscall(libc::SYS_sched_setattr, pid as libc::c_long, std::ptr::from_ref(attr), flags as libc::c_long)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<sched_attr_t>(), 56);
    }

    #[test]
    fn the_kernel_takes_a_valid_attr_and_refuses_a_bad_policy() {
        let mut a = sched_attr_t {
            size: std::mem::size_of::<sched_attr_t>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            ..Default::default()
        };
        // SAFETY: a valid attr for the calling thread.
        assert_eq!(unsafe { sched_setattr(0, &a, 0) }, Ok(()));
        a.sched_policy = 1234;
        // SAFETY: as above; the kernel refuses the policy.
        assert_eq!(unsafe { sched_setattr(0, &a, 0) }, Err(libc::EINVAL));
    }
}
