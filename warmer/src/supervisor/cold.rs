//! The cold start: spawn the service under warmer-init, wait for its probe.

use crate::digest::watch::InputWatch;
use crate::errors::chain;
use crate::manifest::Probe;
use crate::process::init::{self, InitSpec};
use crate::process::logs::Output;
use crate::process::probe::{Prober, Readiness};
use crate::process::service::StartKind;
use crate::process::service::{service_env, Running};
use crate::supervisor::record::ServiceState;

use super::{ready::wait_ready, RunError, Supervisor};

impl Supervisor {
    pub(super) fn cold_start(&mut self) -> Result<Running, RunError> {
        // Watch before the service reads its files, so a change while it
        // starts is not missed.
        self.start_watch(false);
        self.set_state(ServiceState::Starting);
        self.systemd.status("cold start");
        let service = self.manifest.name.clone();
        let prober = Prober::new(&self.manifest.ready.probe, &self.notify_socket());
        let mut prober = prober.map_err(|source| RunError::NotifySocket {
            service: service.clone(),
            path: self.notify_socket(),
            source,
        })?;
        let notify = prober.is_notify().then(|| self.notify_socket());
        let env = service_env(&self.manifest, notify.as_deref(), &self.run_dir).map_err(|why| {
            RunError::StartPre {
                service: service.clone(),
                argv: "env_file".into(),
                why,
            }
        })?;
        let mut output = Output::new().map_err(|source| RunError::Pipes {
            service: service.clone(),
            source,
        })?;
        let sandbox = match &self.manifest.sandbox {
            None => None,
            Some(s) => Some(
                crate::sandbox::Prepared::new(s, &self.run_dir, &[self.exe.path.as_path()])
                    .map_err(|source| RunError::Sandbox {
                        service: service.clone(),
                        source,
                    })?,
            ),
        };
        // In the sandbox, the init's cwd is its own root: the run directory
        // is root's.
        let home = if sandbox.is_some() {
            std::path::Path::new("/")
        } else {
            &self.run_dir
        };
        for step in &self.manifest.exec_start_pre {
            self.exec_start_pre(step, &env, &output, sandbox.as_ref())
                .map_err(|why| RunError::StartPre {
                    service: service.clone(),
                    argv: step.argv.join(" "),
                    why,
                })?;
        }
        let pid = init::spawn(&InitSpec {
            init: &self.exe,
            service: &service,
            home,
            argv: &self.manifest.exec,
            env: &env,
            workdir: self.manifest.workdir.as_deref(),
            stdout: output.stdout.write_fd(),
            stderr: output.stderr.write_fd(),
            sandbox: sandbox.as_ref(),
        })
        .map_err(|source| RunError::Spawn {
            service: service.clone(),
            source,
        })?;
        output.close_write();
        let mut running = Running::new(pid, output, StartKind::Cold);
        self.record.service_pid = Some(pid.as_raw());
        self.set_state(ServiceState::Starting);
        tracing::info!("cold start: warmer-init pid {pid} (the service is its child)");
        let r = self.wait_ready(&mut running, &mut prober);
        let err = match r.clone() {
            Readiness::Ready | Readiness::Stopped => return Ok(running),
            Readiness::Exited(code) | Readiness::ExitedAfterSignal(code) => {
                running.finish();
                self.record.exit_code = Some(code);
                if self.foreign.is_none() {
                    // Often the reason (EADDRINUSE): say who holds the port.
                    self.foreign = self.port_holder();
                }
                RunError::ExitedBeforeReady {
                    service,
                    code,
                    why: self
                        .foreign
                        .clone()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default(),
                }
            }
            // (Hooks run only around restores; a cold start's probe never
            // says this, and it would mean: not ready.)
            Readiness::TimedOut(_) | Readiness::HookFailed(_) => {
                let timeout = match r {
                    Readiness::TimedOut(t) => t,
                    _ => std::time::Duration::ZERO,
                };
                running.stop(self.manifest.stop_timeout, &self.signals);
                running.finish();
                RunError::NotReady {
                    service,
                    timeout,
                    why: self
                        .foreign
                        .clone()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default(),
                }
            }
        };
        self.record.message = Some(chain(&err));
        self.set_state(ServiceState::Failed);
        Err(err)
    }

    /// Who else holds the probed local port, if someone does.
    pub(super) fn port_holder(&self) -> Option<String> {
        let port = match &self.manifest.ready.probe {
            Probe::Http(u) if crate::process::ports::is_local(&u.host) => u.port,
            Probe::Tcp(a) => a
                .rsplit_once(':')
                .filter(|(h, _)| crate::process::ports::is_local(h))
                .and_then(|(_, p)| p.parse().ok())?,
            _ => return None,
        };
        match crate::process::ports::holder(port, nix::unistd::Pid::from_raw(i32::MAX - 1)) {
            crate::process::ports::Holder::Other(who) => {
                Some(format!("port {port} is held by {who}"))
            }
            _ => None,
        }
    }

    /// Polls the probe until ready, exit, stop request or timeout, watching
    /// the digest inputs meanwhile.
    pub(super) fn wait_ready(&mut self, running: &mut Running, prober: &mut Prober) -> Readiness {
        let (timeout, systemd) = (self.manifest.ready.timeout, self.systemd);
        let watch = self.watch.clone();
        let mut changed = None;
        let mut foreign = self.foreign.take();
        let r = wait_ready(
            running,
            prober,
            timeout,
            &self.signals,
            systemd,
            &mut || {
                if changed.is_none() {
                    changed = watch
                        .lock()
                        .expect("watch slot")
                        .as_ref()
                        .and_then(InputWatch::changed);
                }
            },
            Some(&mut foreign),
        );
        self.foreign = foreign;
        if changed.is_some() {
            self.check_inputs();
        }
        r
    }
}

impl Supervisor {
    /// Runs one `exec_start_pre` step to its end (within the readiness
    /// timeout), its output in the service's log: with `+` as root on the
    /// host, as systemd does; else as the service runs, in a sandbox like
    /// its own. A failure stops the start unless the step had `-`.
    fn exec_start_pre(
        &self,
        step: &crate::manifest::ExecStep,
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        output: &Output,
        sandbox: Option<&crate::sandbox::Prepared>,
    ) -> Result<(), String> {
        let limit = self.manifest.ready.timeout;
        let clone_fd = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(std::process::Stdio::from)
                .map_err(|e| format!("cannot pass its output: {e}"))
        };
        let status = if step.privileged {
            let mut cmd = std::process::Command::new(&step.argv[0]);
            cmd.args(&step.argv[1..])
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                .stdout(clone_fd(output.stdout.write_fd())?)
                .stderr(clone_fd(output.stderr.write_fd())?);
            if let Some(w) = &self.manifest.workdir {
                cmd.current_dir(w);
            }
            match crate::process::hooks::run_in_group(&mut cmd, limit) {
                Err(e) => return Err(format!("could not start: {e}")),
                Ok(None) => {
                    return Err(format!(
                        "did not end within {}",
                        humantime::format_duration(limit)
                    ))
                }
                Ok(Some(st)) => st.code().unwrap_or(
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0),
                ),
            }
        } else {
            let pid = init::spawn(&InitSpec {
                init: &self.exe,
                service: &self.manifest.name,
                home: std::path::Path::new("/"),
                argv: &step.argv,
                env,
                workdir: self.manifest.workdir.as_deref(),
                stdout: output.stdout.write_fd(),
                stderr: output.stderr.write_fd(),
                sandbox,
            })
            .map_err(|e| format!("could not start: {}", chain(&e)))?;
            let deadline = std::time::Instant::now() + limit;
            loop {
                use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => break code,
                    Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Ok(_) => {
                        // The init's end ends its namespace.
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = waitpid(pid, None);
                        return Err(format!(
                            "did not end within {}",
                            humantime::format_duration(limit)
                        ));
                    }
                    Err(e) => return Err(format!("could not be waited for: {e}")),
                }
            }
        };
        match status {
            0 => Ok(()),
            code if step.ignore_failure => {
                tracing::warn!(
                    "exec_start_pre {:?} exited with {code} (ignored: -)",
                    step.argv.join(" ")
                );
                Ok(())
            }
            code => Err(format!("exited with status {code}")),
        }
    }
}
