//! `fork VM --copies N [--wait]`: N running copies of a running VM in one
//! request; with `--wait`, follows the copies on one watch until every one
//! is Running (or one fails), with a progress bar.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::context::{Context, Failure};
use crate::follow::{self, Seen};
use crate::kinds;
use crate::progress::{Progress, wanted};

/// Forks `vm` into `copies` VMs; with `wait`, returns once all are Running.
pub async fn fork(ctx: &Context, vm: &str, copies: u32, wait: Option<Duration>) -> Result<(), Failure> {
    let started = Instant::now();
    let made = ctx.client.fork(&ctx.project, vm, copies).await.map_err(|e| Failure::api(&e))?;
    println!("snapshot/{} created", made.snapshot);
    for name in &made.vms {
        println!("vm/{name} created from snapshot/{}", made.snapshot);
    }
    println!("select the copies with -l {}", made.selector);
    let Some(timeout) = wait else { return Ok(()) };
    let kind = kinds::resolve("vm").map_err(Failure::usage)?;
    let bar = Progress::items(wanted(None), u64::from(copies), &format!("fork {}", made.id));
    follow::until_all(ctx, kind, &ctx.project, &made.selector, timeout, |vms, _| {
        let running = vms.values().filter(|v| phase(v) == "Running").count();
        bar.set_position(running as u64);
        if let Some(failed) = vms.values().find(|v| phase(v) == "Failed") {
            let why = failed["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .and_then(|c| c["message"].as_str())
                .unwrap_or("");
            return Seen::Failed(format!("vm/{} Failed: {why}", failed["metadata"]["name"].as_str().unwrap_or("")));
        }
        if running == made.vms.len() {
            Seen::Done
        } else {
            Seen::Waiting(format!("{running} of {} Running", made.vms.len()))
        }
    })
    .await?;
    bar.finish();
    println!("{} copies of vm/{vm} Running after {} ms", made.vms.len(), started.elapsed().as_millis());
    Ok(())
}

fn phase(vm: &Value) -> &str {
    vm["status"]["phase"].as_str().unwrap_or("Pending")
}
