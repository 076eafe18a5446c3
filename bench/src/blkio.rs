//! A slower disk on demand: a cgroup v1 blkio group whose writes to the device under
//! a directory are throttled to a fixed bandwidth. Processes put in it (and their
//! children) see the disk as that slow for direct and written-back I/O alike, which
//! lets a benchmark on a fast disk run a workload whose first bottleneck is the disk.
//!
//! Needs root and the cgroup v1 blkio controller at /sys/fs/cgroup/blkio; `create`
//! says plainly when either is missing. The group is removed when dropped (its
//! processes must have exited by then).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const ROOT: &str = "/sys/fs/cgroup/blkio";

#[derive(Debug)]
pub struct Throttle {
    group: PathBuf,
    /// "major:minor" of the whole disk throttled.
    device: String,
    pub write_bytes_per_s: u64,
}

impl Throttle {
    /// Why this host cannot throttle, if it cannot.
    pub fn unavailable() -> Option<String> {
        if !Path::new(ROOT)
            .join("blkio.throttle.write_bps_device")
            .exists()
        {
            return Some(format!("no cgroup v1 blkio controller at {ROOT}"));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("throttling the disk needs root".into());
        }
        None
    }

    /// A new group `name` throttling writes to the disk holding `dir`.
    pub fn create(name: &str, dir: &Path, write_bytes_per_s: u64) -> Result<Throttle> {
        if let Some(why) = Self::unavailable() {
            bail!("{why}");
        }
        let device = whole_disk(dir)?;
        let group = Path::new(ROOT).join(name);
        let _ = std::fs::remove_dir(&group);
        std::fs::create_dir(&group).with_context(|| format!("creating {}", group.display()))?;
        let throttle = Throttle {
            group,
            device,
            write_bytes_per_s,
        };
        std::fs::write(
            throttle.group.join("blkio.throttle.write_bps_device"),
            format!("{} {write_bytes_per_s}", throttle.device),
        )
        .with_context(|| format!("throttling {} in {}", throttle.device, name))?;
        Ok(throttle)
    }

    /// Moves process `pid` (all its threads) into the group; its future children
    /// start there.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.group.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.group.display()))
    }

    /// Makes `command` start its process inside the group (it joins before exec, so
    /// none of its I/O escapes the throttle).
    pub fn run_inside(&self, command: &mut std::process::Command) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let procs = std::ffi::CString::new(
            self.group
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .context("cgroup path")?;
        // SAFETY: between fork and exec the closure only calls open, write and close
        // (async-signal-safe) on memory prepared before the fork; "0" names the
        // writing process itself.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Bytes the group's processes have written to the device so far.
    pub fn written(&self) -> u64 {
        let text = std::fs::read_to_string(self.group.join("blkio.throttle.io_service_bytes"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == self.device && f.next()? == "Write")
                    .then(|| f.next()?.parse::<u64>().ok())?
            })
            .sum()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.group);
    }
}

/// "major:minor" of the whole disk under `dir` (throttle rules name whole disks, so a
/// partition is traded for its parent).
fn whole_disk(dir: &Path) -> Result<String> {
    let id = crate::device_id(dir).with_context(|| format!("{}", dir.display()))?;
    let sys = PathBuf::from(format!("/sys/dev/block/{id}"));
    if !sys.exists() {
        bail!(
            "{} is on device {id}, which is not a block device (tmpfs, overlay?): nothing to throttle",
            dir.display()
        );
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .with_context(|| format!("the disk holding partition {id}"))?;
        return Ok(parent.trim().to_string());
    }
    Ok(id)
}
