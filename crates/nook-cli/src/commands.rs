//! The client verbs: each turns its arguments into calls of the Rust client and prints a table or JSON.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::StreamExt;
use nook_api::{CreateSandboxRequest, ExecEvent, ExecRequest, ExitStatus, ResourceRequest, Sandbox, SandboxState};
use nook_client::Client;

use crate::{
    client_config, pairs, progress, table, AuditArgs, Command, ImageCommand, KeyCommand, PreviewCommand, TenantCommand,
};

/// Runs one command; returns the process exit code.
pub async fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Serve(args) => crate::serve::run(args).await,
        Command::Openapi => {
            print!("{}", nook_control::api::openapi_json());
            Ok(0)
        }
        other => {
            let config = client_config::load()?;
            let client = Client::new(&config.url, &config.api_key)?;
            client_command(&client, other).await
        }
    }
}

async fn client_command(client: &Client, command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Create(args) => {
            let request = CreateSandboxRequest {
                image: Some(args.image),
                name: args.name,
                labels: pairs(args.labels),
                env: pairs(args.env),
                resources: Some(args.resources.request()),
                isolation: None,
                timeout_s: args.timeout,
                on_deadline: args.on_deadline,
                lifecycle: (args.idle_stop.is_some()
                    || args.delete_after_stopped.is_some()
                    || args.archive_after_stopped.is_some())
                .then_some(nook_api::Lifecycle {
                    idle_stop_s: args.idle_stop,
                    stopped_delete_s: args.delete_after_stopped,
                    stopped_archive_s: args.archive_after_stopped,
                }),
                network: args.egress.given().then(|| args.egress.policy()).transpose()?,
                preview: (!args.public_ports.is_empty() || args.wake_on_request).then(|| nook_api::PreviewSettings {
                    public_ports: args.public_ports.clone(),
                    wake_on_request: args.wake_on_request,
                    ..Default::default()
                }),
            };
            let sandbox = client.create_sandbox(&request).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                println!("{}", sandbox.id);
                eprintln!("created {} ({}), now {}", sandbox.name, sandbox.image, sandbox.state);
            }
            Ok(0)
        }
        Command::Ls(args) => {
            let state = match args.state.as_deref() {
                Some(text) => Some(SandboxState::parse(text).with_context(|| format!("unknown state {text:?}"))?),
                None => None,
            };
            let sandboxes = client.list_sandboxes(state, &pairs(args.labels)).await?;
            if args.json {
                print_json(&sandboxes)?;
            } else if args.quiet {
                for sandbox in &sandboxes {
                    println!("{}", sandbox.id);
                }
            } else {
                print!("{}", sandbox_table(&sandboxes));
            }
            Ok(0)
        }
        Command::Inspect(args) => {
            let sandbox = client.sandbox(&args.sandbox).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                print!("{}", describe(&sandbox));
            }
            Ok(0)
        }
        Command::Events(args) if args.follow => {
            let mut lines = client.follow_sandbox_events(&args.sandbox, 0).await?;
            let mut stdout = std::io::stdout();
            while let Some(line) = lines.next().await {
                match line? {
                    nook_api::SandboxEventLine::Event { event, .. } if args.json => {
                        writeln!(stdout, "{}", serde_json::to_string(&event)?)?;
                    }
                    nook_api::SandboxEventLine::Event { event, .. } => {
                        writeln!(
                            stdout,
                            "{}  {:<9} {:<16} {}",
                            event.at.format("%Y-%m-%d %H:%M:%S"),
                            event.to_state,
                            event.reason.as_str(),
                            event.message
                        )?;
                    }
                    nook_api::SandboxEventLine::Keepalive => continue,
                    nook_api::SandboxEventLine::Deleted => {
                        eprintln!("{} was deleted", args.sandbox);
                        break;
                    }
                }
                stdout.flush()?;
            }
            Ok(0)
        }
        Command::Events(args) => {
            let events = client.sandbox_events(&args.sandbox).await?;
            if args.json {
                print_json(&events)?;
            } else {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|event| {
                        vec![
                            event.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            event.from_state.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                            event.to_state.to_string(),
                            event.reason.as_str().to_string(),
                            event.message.clone(),
                        ]
                    })
                    .collect();
                print!("{}", table::render(&["TIME", "FROM", "TO", "REASON", "MESSAGE"], &rows));
            }
            Ok(0)
        }
        Command::Top(args) => top(client, args.once || args.json, args.json).await,
        Command::Stats(args) => {
            let stats = client.sandbox_stats(&args.sandbox).await?;
            if args.json {
                print_json(&stats)?;
            } else {
                print!("{}", describe_stats(&stats));
            }
            Ok(0)
        }
        Command::Exec(args) if args.detach => {
            let request = exec_request(&args)?;
            let process = client.start_process(&args.sandbox, &request).await?;
            println!("{}", process.pid);
            Ok(0)
        }
        Command::Exec(args) if args.interactive || args.tty => {
            let request = exec_request(&args)?;
            crate::terminal::run_interactive(client, &args.sandbox, request, args.tty).await
        }
        Command::Exec(args) => exec(client, args).await,
        Command::Shell(args) => {
            let request = ExecRequest {
                // The user's login shell as the passwd database names it, else bash, else sh.
                shell: Some(
                    "shell=$(getent passwd \"$(id -un)\" 2>/dev/null | cut -d: -f7); \
                     [ -x \"$shell\" ] || shell=$(command -v bash || command -v sh); exec \"$shell\" -l"
                        .into(),
                ),
                env: pairs(args.env),
                cwd: args.cwd,
                user: args.user,
                ..ExecRequest::default()
            };
            crate::terminal::run_interactive(client, &args.sandbox, request, true).await
        }
        Command::Attach(args) => {
            let process = client.process(&args.sandbox, args.pid).await?;
            if !process.running {
                eprintln!("nook: process {} has already ended; showing its output", args.pid);
            }
            let offset = process.output_bytes.saturating_sub(args.replay);
            crate::terminal::attach(client, &args.sandbox, args.pid, offset, process.terminal).await
        }
        Command::Ps(args) => {
            let processes = client.processes(&args.sandbox).await?;
            if args.json {
                print_json(&processes)?;
            } else {
                let rows: Vec<Vec<String>> = processes
                    .iter()
                    .map(|process| {
                        let status = match &process.exit {
                            None => "running".to_string(),
                            Some(exit) => match (exit.exit_code, exit.signal) {
                                (Some(code), _) => format!("exited {code}"),
                                (None, Some(signal)) => format!("killed by signal {signal}"),
                                (None, None) => "ended".to_string(),
                            },
                        };
                        vec![
                            process.pid.to_string(),
                            status,
                            table::bytes(process.output_bytes),
                            table::age(process.started_at),
                            process.command.join(" "),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["PID", "STATUS", "OUTPUT", "STARTED", "COMMAND"], &rows)
                );
            }
            Ok(0)
        }
        Command::Logs(args) => logs(client, args).await,
        Command::Kill(args) => {
            client.signal_process(&args.sandbox, args.pid, args.signal).await?;
            Ok(0)
        }
        Command::Deadline(args) => {
            let current = match (args.timeout, args.clear) {
                (Some(seconds), _) => Some(seconds),
                (None, true) => None,
                // Only the action changes: keep the deadline where it is.
                (None, false) => client
                    .sandbox(&args.sandbox)
                    .await?
                    .deadline
                    .map(|at| (at - chrono::Utc::now()).num_seconds().max(0) as u64),
            };
            let request = nook_api::SetDeadlineRequest {
                timeout_s: current,
                on_deadline: args.on_deadline,
            };
            let sandbox = client.set_deadline(&args.sandbox, &request).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                match sandbox.deadline {
                    Some(at) => println!(
                        "{}: {} at {}",
                        sandbox.name,
                        sandbox.on_deadline.as_str(),
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                    None => println!("{}: no deadline", sandbox.name),
                }
            }
            Ok(0)
        }
        Command::Stop(args) => {
            each(args.sandboxes, args.json, |key| async move {
                client.stop_sandbox(&key).await
            })
            .await
        }
        Command::Start(args) => {
            each(args.sandboxes, args.json, |key| async move {
                client.start_sandbox(&key).await
            })
            .await
        }
        Command::Pause(args) => {
            each(args.sandboxes, args.json, |key| async move {
                client.pause_sandbox(&key).await
            })
            .await
        }
        Command::Archive(args) => {
            each(args.sandboxes, args.json, |key| async move {
                client.archive_sandbox(&key).await
            })
            .await
        }
        Command::Resume(args) => {
            each(args.sandboxes, args.json, |key| async move {
                client.resume_sandbox(&key).await
            })
            .await
        }
        Command::Lifecycle(args) => {
            if args.idle_stop.is_none() && args.delete_after_stopped.is_none() && args.archive_after_stopped.is_none() {
                bail!(
                    "say what to set: --idle-stop, --archive-after-stopped or --delete-after-stopped (0 turns one off)"
                );
            }
            let request = nook_api::Lifecycle {
                idle_stop_s: args.idle_stop,
                stopped_delete_s: args.delete_after_stopped,
                stopped_archive_s: args.archive_after_stopped,
            };
            let sandbox = client.set_lifecycle(&args.sandbox, &request).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                eprintln!("{}: {}", sandbox.name, describe_lifecycle(&sandbox.lifecycle));
            }
            Ok(0)
        }
        Command::Network(args) => {
            let sandbox = client.set_network(&args.sandbox, &args.egress.policy()?).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                let address = sandbox.address.as_deref().unwrap_or("no address");
                eprintln!("{} ({address}): {}", sandbox.name, sandbox.network.summary());
            }
            Ok(0)
        }
        Command::Preview(command) => preview_command(client, command).await,
        Command::Audit(args) => audit_command(client, args).await,
        Command::Tenant(command) => tenant_command(client, command).await,
        Command::Key(command) => key_command(client, command).await,
        Command::Token(args) => {
            let verbs = args
                .verbs
                .iter()
                .map(|verb| nook_api::tenancy::Verb::parse(verb).expect("clap checked the verb"))
                .collect();
            let request = nook_api::tenancy::CapabilityRequest {
                verbs,
                expires_in_s: args.expires,
            };
            let token = client.capability_token(&args.sandbox, &request).await?;
            if args.json {
                print_json(&token)?;
            } else {
                println!("{}", token.token);
                let verbs: Vec<&str> = token.verbs.iter().map(|verb| verb.as_str()).collect();
                eprintln!(
                    "grants {} on {} until {}",
                    verbs.join(", "),
                    token.sandbox,
                    token.expires_at
                );
            }
            Ok(0)
        }
        Command::Snapshot(args) => {
            let image = client.snapshot_sandbox(&args.sandbox, &args.image).await?;
            if args.json {
                print_json(&image)?;
            } else {
                println!("{}", image.name);
                eprintln!(
                    "snapshot of {} taken as {} ({}, {} layers)",
                    args.sandbox,
                    image.name,
                    short_digest(&image.digest),
                    image.layers.len()
                );
            }
            Ok(0)
        }
        Command::Fork(args) => {
            let labels = pairs(args.labels);
            let request = nook_api::ForkRequest {
                count: args.count,
                names: args.names,
                labels: (!labels.is_empty()).then_some(labels),
                ..Default::default()
            };
            let result = client.fork_sandbox(&args.sandbox, &request).await?;
            if args.json {
                print_json(&result)?;
            } else {
                for fork in &result.sandboxes {
                    println!("{}", fork.id);
                }
                eprintln!(
                    "forked {} into {} (source frozen {:.1} ms)",
                    args.sandbox,
                    result
                        .sandboxes
                        .iter()
                        .map(|fork| fork.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    result.frozen_us as f64 / 1000.0
                );
            }
            Ok(0)
        }
        Command::Resize(args) => {
            let request = args.resources.request();
            if request == ResourceRequest::default() {
                bail!("say what to change: --cpu, --memory, --memory-max, --pids or --disk");
            }
            let sandbox = client.update_resources(&args.sandbox, &request).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                eprintln!("{}", sandbox.state_message);
            }
            Ok(0)
        }
        Command::Rm(args) => {
            let mut failed = false;
            for key in &args.sandboxes {
                match client.delete_sandbox(key).await {
                    Ok(()) => println!("{key}"),
                    Err(error) => {
                        eprintln!("nook: {key}: {error}");
                        failed = true;
                    }
                }
            }
            Ok(u8::from(failed))
        }
        Command::Image(image) => image_command(client, image).await,
        Command::Cp(args) => crate::copy::copy(client, &args.source, &args.destination).await,
        Command::Files(files) => files_command(client, files).await,
        Command::Serve(_) | Command::Openapi => unreachable!("handled in run"),
    }
}

/// Applies an operation to several sandboxes, reporting each; exit code 1 if any failed.
async fn each<F, Fut>(keys: Vec<String>, json: bool, operation: F) -> anyhow::Result<u8>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Sandbox, nook_client::ClientError>>,
{
    let mut failed = false;
    let mut done = Vec::new();
    for key in keys {
        match operation(key.clone()).await {
            Ok(sandbox) => {
                if !json {
                    println!("{}", sandbox.name);
                }
                done.push(sandbox);
            }
            Err(error) => {
                eprintln!("nook: {key}: {error}");
                failed = true;
            }
        }
    }
    if json {
        print_json(&done)?;
    }
    Ok(u8::from(failed))
}

fn exec_request(args: &crate::ExecArgs) -> anyhow::Result<ExecRequest> {
    Ok(ExecRequest {
        command: args.command.clone(),
        env: pairs(args.env.clone()),
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        timeout_ms: args.timeout.map(|seconds| (seconds * 1000.0).ceil().max(1.0) as u64),
        ..ExecRequest::default()
    })
}

/// Prints a background process's output; with `-f`, reconnects after a dropped connection from the last offset
/// seen, so nothing is lost or repeated, and exits with the process's exit code.
async fn logs(client: &Client, args: crate::LogsArgs) -> anyhow::Result<u8> {
    let mut offset = 0u64;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut retries = 0;
    loop {
        let mut events = client
            .process_output(&args.sandbox, args.pid, offset, args.follow)
            .await?;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) if args.follow && retries < 5 => {
                    retries += 1;
                    eprintln!("nook: the output stream broke ({error}); reconnecting from offset {offset}");
                    break;
                }
                Err(error) => return Err(error.into()),
            };
            match event {
                ExecEvent::Attached { offset: start, missed } => {
                    if missed > 0 {
                        eprintln!("nook: {missed} bytes of earlier output are no longer buffered");
                    }
                    offset = start;
                }
                ExecEvent::Stdout { data, .. } => {
                    let bytes = decode_chunk(&data)?;
                    offset += bytes.len() as u64;
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                ExecEvent::Stderr { data, .. } => {
                    let bytes = decode_chunk(&data)?;
                    offset += bytes.len() as u64;
                    stderr.write_all(&bytes)?;
                    stderr.flush()?;
                }
                ExecEvent::Exit { status, .. } => {
                    return Ok(match (status.exit_code, status.signal) {
                        (Some(code), _) if args.follow => code.clamp(0, 255) as u8,
                        (None, Some(signal)) if args.follow => (128 + signal).clamp(0, 255) as u8,
                        _ => 0,
                    })
                }
                ExecEvent::End { .. } => return Ok(0),
                ExecEvent::Error { message, .. } => bail!("{message}"),
                ExecEvent::Started { .. } | ExecEvent::Keepalive | ExecEvent::Notice { .. } => {}
            }
        }
        retries += 1;
        if retries > 5 {
            bail!("the output stream keeps ending before the process does");
        }
    }
}

async fn exec(client: &Client, args: crate::ExecArgs) -> anyhow::Result<u8> {
    let request = exec_request(&args)?;
    let mut events = client.exec_stream(&args.sandbox, &request).await?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(event) = events.next().await {
        match event? {
            ExecEvent::Started { .. }
            | ExecEvent::Keepalive
            | ExecEvent::Attached { .. }
            | ExecEvent::End { .. }
            | ExecEvent::Notice { .. } => {}
            ExecEvent::Stdout { data, .. } => {
                stdout.write_all(&decode_chunk(&data)?)?;
                stdout.flush()?;
            }
            ExecEvent::Stderr { data, .. } => {
                stderr.write_all(&decode_chunk(&data)?)?;
                stderr.flush()?;
            }
            ExecEvent::Exit { status, .. } => {
                if status.timed_out {
                    eprintln!("nook: the command ran past its timeout and was killed");
                }
                return Ok(exit_code(status));
            }
            ExecEvent::Error { code, message } => {
                eprintln!("nook: {message}");
                return Ok(match code.as_str() {
                    "spawn_failed" if message.contains("not found") => 127,
                    "spawn_failed" => 126,
                    _ => 125,
                });
            }
        }
    }
    bail!("the server ended the stream without the command's exit status")
}

/// The raw bytes of an output chunk (base64 on the wire).
pub(crate) fn decode_chunk(data: &str) -> anyhow::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .context("corrupt output chunk")
}

/// The exit code that reports how a process ended: its own, 128 + the signal that killed it, or 125 when neither is
/// known.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    match (status.exit_code, status.signal) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 125,
    }
}

async fn files_command(client: &Client, command: crate::FilesCommand) -> anyhow::Result<u8> {
    use crate::FilesCommand;
    match command {
        FilesCommand::Ls {
            sandbox,
            path,
            depth,
            json,
        } => {
            let entries = client.list_files(&sandbox, &path, depth).await?;
            if json {
                print_json(&entries)?;
            } else {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|entry| {
                        let name = match &entry.symlink_target {
                            Some(target) => format!("{} -> {target}", entry.path),
                            None => entry.path.clone(),
                        };
                        vec![
                            format!("{:?}", entry.kind).to_lowercase(),
                            format!("{:o}", entry.mode),
                            format!("{}:{}", entry.uid, entry.gid),
                            entry.size.to_string(),
                            entry.modified_at.format("%Y-%m-%d %H:%M").to_string(),
                            name,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["KIND", "MODE", "OWNER", "SIZE", "MODIFIED", "PATH"], &rows)
                );
            }
        }
        FilesCommand::Cat { sandbox, path } => {
            let mut stream = client.download_file(&sandbox, &path).await?;
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk?)?;
            }
            stdout.flush()?;
        }
        FilesCommand::Stat { sandbox, path } => print_json(&client.stat_file(&sandbox, &path).await?)?,
        FilesCommand::Mkdir { sandbox, path } => {
            client.make_dir(&sandbox, &path).await?;
        }
        FilesCommand::Mv { sandbox, from, to } => {
            client.move_file(&sandbox, &from, &to).await?;
        }
        FilesCommand::Rm {
            sandbox,
            path,
            recursive,
        } => client.remove_file(&sandbox, &path, recursive).await?,
    }
    Ok(0)
}

async fn image_command(client: &Client, command: ImageCommand) -> anyhow::Result<u8> {
    match command {
        ImageCommand::Ls { json } => {
            let images = client.list_images().await?;
            if json {
                print_json(&images)?;
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|image| {
                        vec![
                            image.name.clone(),
                            short_digest(&image.digest),
                            table::bytes(image.size_bytes),
                            image.layers.len().to_string(),
                            table::age(image.created_at),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["NAME", "DIGEST", "SIZE", "LAYERS", "CREATED"], &rows)
                );
            }
            Ok(0)
        }
        ImageCommand::Import { name, path, json } => {
            let sent = Arc::new(AtomicU64::new(0));
            let body = archive_body(&path, sent.clone())?;
            let progress = tokio::spawn(show_progress(sent.clone()));
            let result = client.import_image(&name, body).await;
            progress.abort();
            eprintln!("\rsent {}          ", table::bytes(sent.load(Ordering::Relaxed)));
            let image = result?;
            if json {
                print_json(&image)?;
            } else {
                println!("{}", image.digest);
                eprintln!("imported {} ({})", image.name, table::bytes(image.size_bytes));
            }
            Ok(0)
        }
        ImageCommand::Pull { reference, name, json } => {
            let mut progress = progress::TransferProgress::new("pulling");
            let request = nook_api::PullRequest { reference, name };
            let image = client.pull_image(&request, |event| progress.show(event)).await?;
            if json {
                print_json(&image)?;
            } else {
                println!("{}", image.digest);
                eprintln!("pulled {} ({})", image.name, table::bytes(image.size_bytes));
            }
            Ok(0)
        }
        ImageCommand::Push { name, reference } => {
            let mut progress = progress::TransferProgress::new("pushing");
            let request = nook_api::PushRequest {
                name: name.clone(),
                reference: reference.clone(),
            };
            client.push_image(&request, |event| progress.show(event)).await?;
            eprintln!("pushed {name} to {reference}");
            Ok(0)
        }
        ImageCommand::Prune { json } => {
            let result = client.prune_images().await?;
            if json {
                print_json(&result)?;
            } else {
                println!(
                    "removed {} images and {} layers, freed {}",
                    result.images_removed,
                    result.layers_removed,
                    table::bytes(result.bytes_freed)
                );
            }
            Ok(0)
        }
        ImageCommand::Tag { source, target } => {
            let image = client.tag_image(&source, &target).await?;
            println!("{}", image.name);
            Ok(0)
        }
        ImageCommand::Inspect { name } => {
            print_json(&client.image(&name).await?)?;
            Ok(0)
        }
        ImageCommand::Rm { name } => {
            client.remove_image(&name).await?;
            println!("{name}");
            Ok(0)
        }
        ImageCommand::Export { name, output } => {
            let mut chunks = client.export_image(&name).await?;
            let to_stdout = output.as_os_str() == "-";
            // Into a temporary file beside the target, renamed into place once complete.
            let partial = output.with_extension("partial");
            let mut out: Box<dyn std::io::Write> = if to_stdout {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?,
                ))
            };
            let mut written = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(error) => {
                        drop(out);
                        if !to_stdout {
                            let _ = std::fs::remove_file(&partial);
                        }
                        return Err(error).context("the export broke off");
                    }
                };
                out.write_all(&chunk)?;
                written += chunk.len() as u64;
            }
            out.flush()?;
            drop(out);
            if !to_stdout {
                std::fs::rename(&partial, &output).with_context(|| format!("renaming to {}", output.display()))?;
            }
            eprintln!("exported {name} ({})", table::bytes(written));
            Ok(0)
        }
        ImageCommand::Build {
            context,
            tag,
            file,
            build_args,
            no_cache,
            timeout,
            start_cmd,
            ready_cmd,
            ready_timeout,
            json,
        } => {
            let args = crate::build::BuildArgs {
                context,
                name: tag,
                dockerfile: file,
                build_args,
                no_cache,
                timeout,
                start_command: start_cmd,
                ready_command: ready_cmd,
                ready_timeout,
                json,
            };
            crate::build::build(client, args).await
        }
    }
}

/// Prints the bytes sent so far twice a second while an upload runs.
async fn show_progress(sent: Arc<AtomicU64>) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        ticker.tick().await;
        eprint!("\rsending {} ...", table::bytes(sent.load(Ordering::Relaxed)));
    }
}

/// The upload body for `nook image import`: a tarball as it is, stdin, or a directory packed on the fly (sorted, so
/// the same tree gives the same layer digest). Nothing is buffered whole.
fn archive_body(path: &Path, sent: Arc<AtomicU64>) -> anyhow::Result<reqwest::Body> {
    let (reader, writer) = tokio::io::duplex(1 << 20);
    let path: PathBuf = path.to_path_buf();
    if path.as_os_str() == "-" {
        tokio::spawn(async move {
            let mut writer = writer;
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut writer).await;
        });
    } else if path.is_dir() {
        let writer = tokio_util::io::SyncIoBridge::new(writer);
        tokio::task::spawn_blocking(move || {
            let mut builder = tar::Builder::new(writer);
            builder.follow_symlinks(false);
            let mut everything = |_: &Path, _: std::fs::FileType| Visit {
                include: true,
                descend: true,
            };
            if let Err(error) = append_tree(&mut builder, &path, Path::new(""), &mut everything) {
                eprintln!("\nnook: packing {} failed: {error}", path.display());
                return;
            }
            let _ = builder.into_inner();
        });
    } else {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        tokio::spawn(async move {
            let mut writer = writer;
            let _ = tokio::io::copy(&mut tokio::fs::File::from_std(file), &mut writer).await;
        });
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20).map(move |chunk| {
        if let Ok(chunk) = &chunk {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        chunk
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// What [`append_tree`] does with one entry.
pub(crate) struct Visit {
    /// Append it.
    pub include: bool,
    /// Append what is under it (for a directory).
    pub descend: bool,
}

/// Appends the entries under `root/relative`, sorted by name, each as `filter` says (given its path relative to
/// `root` and its type); returns how many were appended. Links are appended as links.
pub(crate) fn append_tree<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    relative: &Path,
    filter: &mut dyn FnMut(&Path, std::fs::FileType) -> Visit,
) -> std::io::Result<u64> {
    let dir = root.join(relative);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let mut appended = 0;
    for entry in entries {
        let name = relative.join(entry.file_name());
        let kind = entry.file_type()?;
        let visit = filter(&name, kind);
        if visit.include {
            builder.append_path_with_name(entry.path(), &name)?;
            appended += 1;
        }
        if kind.is_dir() && visit.descend {
            appended += append_tree(builder, root, &name, filter)?;
        }
    }
    Ok(appended)
}

pub(crate) fn short_digest(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

fn sandbox_table(sandboxes: &[Sandbox]) -> String {
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|sandbox| {
            vec![
                sandbox.id.clone(),
                sandbox.name.clone(),
                sandbox.image.clone(),
                sandbox.state.to_string(),
                format!("{} CPU, {} MiB", sandbox.resources.cpu, sandbox.resources.memory_mb),
                table::age(sandbox.created_at),
            ]
        })
        .collect();
    table::render(&["ID", "NAME", "IMAGE", "STATE", "LIMITS", "CREATED"], &rows)
}

fn describe(sandbox: &Sandbox) -> String {
    let labels: Vec<String> = sandbox.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let rows = [
        ("id", sandbox.id.clone()),
        ("name", sandbox.name.clone()),
        (
            "image",
            format!("{} ({})", sandbox.image, short_digest(&sandbox.image_digest)),
        ),
        ("isolation", format!("{:?}", sandbox.isolation).to_lowercase()),
        ("state", sandbox.state.to_string()),
        ("reason", sandbox.state_reason.as_str().to_string()),
        ("message", sandbox.state_message.clone()),
        ("cpu", sandbox.resources.cpu.to_string()),
        (
            "memory",
            match sandbox.resources.memory_max_mb {
                Some(ceiling) => format!("{} MiB (grows up to {ceiling} MiB)", sandbox.resources.memory_mb),
                None => format!("{} MiB", sandbox.resources.memory_mb),
            },
        ),
        ("pids", sandbox.resources.pids.to_string()),
        (
            "disk quota",
            sandbox
                .resources
                .disk_mb
                .map_or_else(|| "none".to_string(), |mb| format!("{mb} MiB")),
        ),
        ("parent", sandbox.parent.clone().unwrap_or_else(|| "-".to_string())),
        ("lifecycle", describe_lifecycle(&sandbox.lifecycle)),
        ("network", sandbox.network.summary()),
        ("preview", describe_preview(&sandbox.preview)),
        ("oom kills", sandbox.oom_kills.to_string()),
        ("labels", labels.join(", ")),
        ("created", sandbox.created_at.to_rfc3339()),
        ("updated", sandbox.updated_at.to_rfc3339()),
    ];
    rows.iter().map(|(key, value)| format!("{key:<10} {value}\n")).collect()
}

/// One row of `nook top`.
#[derive(serde::Serialize)]
struct TopRow {
    id: String,
    name: String,
    state: SandboxState,
    cpu_percent: f64,
    cpu_limit: f64,
    memory_used_bytes: u64,
    memory_limit_bytes: u64,
    memory_peak_bytes: u64,
    disk_used_bytes: u64,
    pids: u64,
}

/// `nook top`: every running or paused sandbox's usage, CPU as a share of a core over the interval between two
/// readings.
async fn top(client: &Client, once: bool, json: bool) -> anyhow::Result<u8> {
    let interval = std::time::Duration::from_secs(if once { 1 } else { 2 });
    let mut previous: std::collections::HashMap<String, nook_api::SandboxStats> = Default::default();
    loop {
        let live: Vec<Sandbox> = client
            .list_sandboxes(None, &Default::default())
            .await?
            .into_iter()
            .filter(|sandbox| matches!(sandbox.state, SandboxState::Running | SandboxState::Paused))
            .collect();
        let mut readings = Vec::new();
        for sandbox in live {
            // A sandbox that stopped between the list and its reading is left out.
            if let Ok(stats) = client.sandbox_stats(&sandbox.id).await {
                readings.push((sandbox, stats));
            }
        }
        let ready = !previous.is_empty() || readings.is_empty();
        if ready {
            let rows: Vec<TopRow> = readings
                .iter()
                .map(|(sandbox, stats)| {
                    let cpu_percent = previous.get(&sandbox.id).map_or(0.0, |before| {
                        let wall = (stats.at - before.at).num_nanoseconds().unwrap_or(0).max(1) as f64;
                        stats.cpu_used_ns.saturating_sub(before.cpu_used_ns) as f64 / wall * 100.0
                    });
                    TopRow {
                        id: sandbox.id.clone(),
                        name: sandbox.name.clone(),
                        state: sandbox.state,
                        cpu_percent,
                        cpu_limit: stats.cpu_limit,
                        memory_used_bytes: stats.memory_used_bytes,
                        memory_limit_bytes: stats.memory_limit_bytes,
                        memory_peak_bytes: stats.memory_peak_bytes,
                        disk_used_bytes: stats.disk_used_bytes,
                        pids: stats.pids,
                    }
                })
                .collect();
            if json {
                print_json(&rows)?;
            } else {
                let table_rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|row| {
                        vec![
                            row.name.clone(),
                            row.state.to_string(),
                            format!("{:.1}% / {:.0}%", row.cpu_percent, row.cpu_limit * 100.0),
                            format!(
                                "{} / {}",
                                table::bytes(row.memory_used_bytes),
                                table::bytes(row.memory_limit_bytes)
                            ),
                            table::bytes(row.memory_peak_bytes),
                            table::bytes(row.disk_used_bytes),
                            row.pids.to_string(),
                        ]
                    })
                    .collect();
                if !once {
                    // Clear the screen and go home, as top does.
                    print!("\x1b[2J\x1b[H");
                }
                print!(
                    "{}",
                    table::render(&["NAME", "STATE", "CPU", "MEMORY", "PEAK", "DISK", "PIDS"], &table_rows)
                );
                std::io::stdout().flush()?;
            }
            if once {
                return Ok(0);
            }
        }
        previous = readings
            .into_iter()
            .map(|(sandbox, stats)| (sandbox.id, stats))
            .collect();
        tokio::time::sleep(interval).await;
    }
}

/// The phrases that are there, joined with commas; `none` when none is.
fn phrases(parts: impl IntoIterator<Item = Option<String>>, none: &str) -> String {
    let parts: Vec<String> = parts.into_iter().flatten().collect();
    if parts.is_empty() {
        none.to_string()
    } else {
        parts.join(", ")
    }
}

fn describe_lifecycle(lifecycle: &nook_api::Lifecycle) -> String {
    phrases(
        [
            lifecycle.idle_stop_s.map(|idle| format!("stops after {idle} s idle")),
            lifecycle
                .stopped_archive_s
                .map(|after| format!("archived {after} s after it stops")),
            lifecycle
                .stopped_delete_s
                .map(|after| format!("deleted {after} s after it stops")),
        ],
        "runs until stopped or deleted",
    )
}

fn describe_preview(preview: &nook_api::PreviewSettings) -> String {
    let ports = if preview.all_ports_public {
        "every port public".to_string()
    } else if preview.public_ports.is_empty() {
        "every port private (token or signed link)".to_string()
    } else {
        let ports: Vec<String> = preview.public_ports.iter().map(u16::to_string).collect();
        format!("public ports {}, the others private", ports.join(", "))
    };
    if preview.wake_on_request {
        format!("{ports}; a request wakes it")
    } else {
        ports
    }
}

fn describe_stats(stats: &nook_api::SandboxStats) -> String {
    let disk = if stats.disk_used_complete {
        table::bytes(stats.disk_used_bytes)
    } else {
        format!("at least {}", table::bytes(stats.disk_used_bytes))
    };
    let rows = [
        ("running since", stats.started_at.to_rfc3339()),
        (
            "cpu time",
            format!(
                "{:.2} s (limit {} cores)",
                stats.cpu_used_ns as f64 / 1e9,
                stats.cpu_limit
            ),
        ),
        (
            "memory",
            format!(
                "{} of {} (page cache {})",
                table::bytes(stats.memory_used_bytes),
                table::bytes(stats.memory_limit_bytes),
                table::bytes(stats.memory_cache_bytes)
            ),
        ),
        ("processes", stats.pids.to_string()),
        (
            "disk",
            format!("{disk} (filesystem {})", table::bytes(stats.disk_total_bytes)),
        ),
    ];
    rows.iter().map(|(key, value)| format!("{key:<14} {value}\n")).collect()
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn preview_command(client: &Client, command: PreviewCommand) -> anyhow::Result<u8> {
    match command {
        PreviewCommand::Url(args) => {
            let access = client.port_access(&args.sandbox, args.port).await?;
            if args.json {
                print_json(&access)?;
            } else {
                let access_word = if access.public { "public" } else { "token" };
                let rows: Vec<Vec<String>> = access
                    .url
                    .iter()
                    .chain(std::iter::once(&access.path_url))
                    .map(|url| vec![access.port.to_string(), access_word.to_string(), url.clone()])
                    .collect();
                print!("{}", table::render(&["PORT", "ACCESS", "URL"], &rows));
                println!("token: {}", access.token);
                eprintln!(
                    "send the token in the Nook-Preview-Token header or the {} query parameter",
                    nook_api::preview::TOKEN_QUERY
                );
            }
            Ok(0)
        }
        PreviewCommand::Link(args) => {
            let link = client.make_preview_link(&args.sandbox, args.port, args.expires).await?;
            if args.json {
                print_json(&link)?;
            } else {
                println!(
                    "{}",
                    link.url.as_ref().or(link.path_url.as_ref()).map_or("", String::as_str)
                );
                eprintln!(
                    "link {} works until {} (nook preview revoke {} {} ends it sooner)",
                    link.id, link.expires_at, args.sandbox, link.id
                );
            }
            Ok(0)
        }
        PreviewCommand::Links(args) => {
            let links = client.preview_links(&args.sandbox).await?;
            if args.json {
                print_json(&links)?;
            } else {
                let now = chrono::Utc::now();
                let mut rows = Vec::new();
                for link in &links.links {
                    let status = if link.revoked_at.is_some() {
                        "revoked"
                    } else if link.expires_at <= now {
                        "expired"
                    } else {
                        "active"
                    };
                    rows.push(vec![
                        link.id.clone(),
                        link.port.to_string(),
                        link.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        status.to_string(),
                    ]);
                }
                print!("{}", table::render(&["ID", "PORT", "EXPIRES", "STATUS"], &rows));
            }
            Ok(0)
        }
        PreviewCommand::Revoke(args) => {
            let link = client.revoke_preview_link(&args.sandbox, &args.link).await?;
            eprintln!("revoked {} (port {})", link.id, link.port);
            Ok(0)
        }
        PreviewCommand::Set(args) => {
            let current = client.sandbox(&args.sandbox).await?;
            let public_ports = (!args.public.is_empty() || !args.private.is_empty()).then(|| {
                let mut ports: Vec<u16> = current.preview.public_ports.clone();
                ports.extend(&args.public);
                ports.retain(|port| !args.private.contains(port));
                ports
            });
            let request = nook_api::PreviewSettingsRequest {
                public_ports,
                all_ports_public: args.all_public,
                wake_on_request: args.wake_on_request,
                rotate_tokens: args.rotate,
                upstream_host: args.upstream_host,
            };
            let sandbox = client.set_preview(&args.sandbox, &request).await?;
            if args.json {
                print_json(&sandbox)?;
            } else {
                eprintln!("{}: {}", sandbox.name, sandbox.state_message);
            }
            Ok(0)
        }
    }
}

async fn audit_command(client: &Client, args: AuditArgs) -> anyhow::Result<u8> {
    let mut query = nook_api::audit::AuditQuery {
        kind: args.kind.as_deref().and_then(nook_api::audit::AuditKind::parse),
        sandbox: args.sandbox.clone(),
        tenant: args.tenant.clone(),
        allowed: args.denied.then_some(false),
        since: args
            .since
            .map(|seconds| chrono::Utc::now() - chrono::Duration::seconds(seconds as i64)),
        after: None,
        before: None,
        newest_first: false,
        limit: args.limit,
    };
    if args.jsonl {
        let mut events = client.export_audit(&query).await?;
        let mut out = std::io::stdout().lock();
        while let Some(event) = events.next().await {
            writeln!(out, "{}", serde_json::to_string(&event?)?)?;
        }
        return Ok(0);
    }
    // The newest `limit` events, shown oldest first.
    query.limit = Some(args.limit.unwrap_or(50).clamp(1, nook_api::audit::MAX_AUDIT_PAGE));
    query.newest_first = true;
    let mut kept = client.audit(&query).await?.events;
    kept.reverse();
    if args.json {
        print_json(&kept)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = kept
        .iter()
        .map(|event| {
            let what = match &event.target {
                Some(target) => format!("{} {target}", event.action),
                None => event.action.clone(),
            };
            let mut result = event.outcome.clone();
            if let Some(rule) = event.rule {
                result.push_str(&format!(" (rule {rule})"));
            }
            if let Some(reason) = &event.reason {
                result.push_str(&format!(": {reason}"));
            }
            vec![
                event.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                event.kind.as_str().to_string(),
                event.actor.clone().unwrap_or_else(|| "-".into()),
                event.sandbox.clone().unwrap_or_else(|| "-".into()),
                what,
                result,
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["TIME", "KIND", "WHO", "SANDBOX", "WHAT", "RESULT"], &rows)
    );
    Ok(0)
}

fn quota_of(args: &crate::TenantArgs) -> nook_api::tenancy::TenantQuota {
    nook_api::tenancy::TenantQuota {
        sandboxes: args.max_sandboxes,
        cpu: args.max_cpu,
        memory_mb: args.max_memory,
    }
}

fn describe_quota(quota: &nook_api::tenancy::TenantQuota) -> String {
    phrases(
        [
            quota.sandboxes.map(|sandboxes| format!("{sandboxes} sandboxes")),
            quota.cpu.map(|cpu| format!("{cpu} cores")),
            quota.memory_mb.map(|memory| format!("{memory} MiB")),
        ],
        "unlimited",
    )
}

async fn tenant_command(client: &Client, command: TenantCommand) -> anyhow::Result<u8> {
    match command {
        TenantCommand::Create(args) => {
            let request = nook_api::tenancy::CreateTenantRequest {
                name: args.name.clone(),
                quota: quota_of(&args),
            };
            let tenant = client.create_tenant(&request).await?;
            if args.json {
                print_json(&tenant)?;
            } else {
                eprintln!("tenant {} made (quota: {})", tenant.name, describe_quota(&tenant.quota));
            }
        }
        TenantCommand::Ls(args) => {
            let tenants = client.tenants().await?;
            if args.json {
                print_json(&tenants)?;
            } else {
                let rows: Vec<Vec<String>> = tenants
                    .tenants
                    .iter()
                    .map(|tenant| {
                        vec![
                            tenant.name.clone(),
                            describe_quota(&tenant.quota),
                            table::age(tenant.created_at),
                        ]
                    })
                    .collect();
                print!("{}", table::render(&["NAME", "QUOTA", "CREATED"], &rows));
            }
        }
        TenantCommand::Quota(args) => {
            let tenant = client.set_tenant_quota(&args.name, &quota_of(&args)).await?;
            if args.json {
                print_json(&tenant)?;
            } else {
                eprintln!("tenant {}: quota {}", tenant.name, describe_quota(&tenant.quota));
            }
        }
    }
    Ok(0)
}

async fn key_command(client: &Client, command: KeyCommand) -> anyhow::Result<u8> {
    match command {
        KeyCommand::Create(args) => {
            let request = nook_api::tenancy::CreateKeyRequest {
                name: args.name,
                scope: nook_api::tenancy::Scope::parse(&args.scope).expect("clap checked the scope"),
                tenant: args.tenant,
                expires_in_s: args.expires,
            };
            let created = client.create_key(&request).await?;
            if args.json {
                print_json(&created)?;
            } else {
                println!("{}", created.key);
                eprintln!(
                    "key {} ({}, {} scope, tenant {}): shown once; only its hash is kept",
                    created.info.id,
                    created.info.name,
                    created.info.scope.as_str(),
                    created.info.tenant
                );
            }
        }
        KeyCommand::Ls(args) => {
            let keys = client.keys().await?;
            if args.json {
                print_json(&keys)?;
            } else {
                let now = chrono::Utc::now();
                let rows: Vec<Vec<String>> = keys
                    .keys
                    .iter()
                    .map(|key| {
                        let status = if key.revoked_at.is_some() {
                            "revoked".to_string()
                        } else {
                            match key.expires_at {
                                Some(at) if at <= now => "expired".to_string(),
                                Some(at) => format!("until {}", at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                                None => "active".to_string(),
                            }
                        };
                        vec![
                            key.id.clone(),
                            key.name.clone(),
                            key.tenant.clone(),
                            key.scope.as_str().to_string(),
                            status,
                        ]
                    })
                    .collect();
                print!("{}", table::render(&["ID", "NAME", "TENANT", "SCOPE", "STATUS"], &rows));
            }
        }
        KeyCommand::Revoke { id } => {
            let key = client.revoke_key(&id).await?;
            eprintln!("revoked {} ({})", key.id, key.name);
        }
    }
    Ok(0)
}
