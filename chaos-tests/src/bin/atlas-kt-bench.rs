//! `atlas-kt-bench`: the key transparency benchmark of `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p atlas-chaos --bin atlas-kt-bench
//! target/release/atlas-kt-bench --entries 1000000
//! ```
//!
//! It appends `--entries` device registrations to a fresh node store (sled on the disk of
//! `--data-parent`) through the same storage call the directory uses, flushing (fsync) after
//! every `--batch` appends as the node's group commit does under load. Then it measures, at the
//! final size: lookups with inclusion proofs through the node's key transparency service,
//! single proof generation and verification, consistency proofs, proof sizes at several log
//! sizes, and the store's size on disk. Results print as Markdown.
//!
//! The first device of each account registers it and the others are enrolled by the first.
//! Entries carry placeholder signatures: the log does not verify signatures when appending
//! (the directory does that before), so the append rate excludes the Ed25519 checks of a
//! login or enrollment, which this benchmark does not measure.

use atlas_actors::{KeyTransparency, Keyring};
use atlas_protocol::DeviceId;
use atlas_protocol::transparency::{Authorization, KeyEvent, KeyEventKind};
use atlas_storage::{DeviceRecord, DirectoryChange, Store};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "atlas-kt-bench",
    about = "Benchmark of the key transparency log"
)]
struct Args {
    /// Entries to append.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Appends between two flushes.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Devices per account; lookups return this many proofs.
    #[arg(long, default_value_t = 2)]
    devices_per_account: u64,
    /// Lookups and proofs to time.
    #[arg(long, default_value_t = 20_000)]
    samples: u64,
    /// Directory under which the store is created (and removed afterwards).
    #[arg(long, default_value = ".")]
    data_parent: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.entries >= 2, "--entries must be at least 2");
    anyhow::ensure!(
        args.batch >= 1 && args.devices_per_account >= 1 && args.samples >= 1,
        "--batch, --devices-per-account and --samples must be at least 1"
    );
    let dir = tempfile::Builder::new()
        .prefix("atlas-kt-bench-")
        .tempdir_in(&args.data_parent)?;
    let store = Store::open(dir.path())?;
    let keyring = Arc::new(Keyring::open(
        store.clone(),
        &[7; 32],
        Duration::from_secs(3600),
    )?);
    let kt = KeyTransparency::open(store.clone(), keyring)?;

    println!("## Key transparency log, {} entries\n", args.entries);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut flushes = Vec::new();
    for index in 0..args.entries {
        let (event, record) = registration(index, args.devices_per_account);
        // The first device registers the account; the others are enrolled by it.
        let first = index - index % args.devices_per_account;
        let change = if first == index {
            DirectoryChange::Register(record)
        } else {
            DirectoryChange::Enroll {
                signer: device_id(first),
                record,
            }
        };
        store.append_key_event(&event, &change)?;
        if (index + 1) % args.batch == 0 || index + 1 == args.entries {
            let flush = Instant::now();
            store.durable().await?;
            flushes.push(flush.elapsed());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "appended {} of {} entries ({:.0}/s so far)",
                index + 1,
                args.entries,
                (index + 1) as f64 / started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let append_time = started.elapsed();
    flushes.sort();
    println!(
        "- appends: {} in {:.1} s = **{:.0} appends/s** (fsync every {} appends; flush p50 {:.2} ms, p99 {:.2} ms)",
        args.entries,
        append_time.as_secs_f64(),
        args.entries as f64 / append_time.as_secs_f64(),
        args.batch,
        ms(percentile(&flushes, 50)),
        ms(percentile(&flushes, 99)),
    );

    let head = kt.head().await?;
    let accounts = args.entries.div_ceil(args.devices_per_account);
    let mut lookups = Vec::new();
    let mut proofs = Vec::new();
    let mut verifications = Vec::new();
    let mut path_bytes = 0usize;
    for i in 0..args.samples {
        let account = format!("user{}", spread(i, accounts));
        let lookup = Instant::now();
        let (lookup_head, entries) = kt.lookup(&account).await?;
        lookups.push(lookup.elapsed());
        anyhow::ensure!(!entries.is_empty(), "account {account} has no entries");

        let index = spread(i, args.entries);
        let prove = Instant::now();
        let proof = kt.prove(index, &head)?;
        proofs.push(prove.elapsed());
        path_bytes = path_bytes.max(proof.path.len() * 32);

        let verify = Instant::now();
        let event = proof.verify(&head)?;
        verifications.push(verify.elapsed());
        anyhow::ensure!(lookup_head.size == head.size && event.time_ms == index);
    }
    for samples in [&mut lookups, &mut proofs, &mut verifications] {
        samples.sort();
    }
    println!(
        "- lookup of an account ({} devices, each with its proof): p50 {:.3} ms, **p99 {:.3} ms**",
        args.devices_per_account,
        ms(percentile(&lookups, 50)),
        ms(percentile(&lookups, 99))
    );
    println!(
        "- inclusion proof generation: p50 {:.3} ms, p99 {:.3} ms; verification: p50 {:.3} ms, p99 {:.3} ms",
        ms(percentile(&proofs, 50)),
        ms(percentile(&proofs, 99)),
        ms(percentile(&verifications, 50)),
        ms(percentile(&verifications, 99))
    );

    let mut consistency = Vec::new();
    for i in 0..args.samples.min(2000) {
        let from = 1 + spread(i, args.entries - 1);
        let timer = Instant::now();
        kt.consistency(from, args.entries)?;
        consistency.push(timer.elapsed());
    }
    consistency.sort();
    println!(
        "- consistency proof generation to the full size: p50 {:.3} ms, p99 {:.3} ms",
        ms(percentile(&consistency, 50)),
        ms(percentile(&consistency, 99))
    );

    println!(
        "\n| log size | inclusion proof hashes | bytes | consistency proof hashes (from size/2) |"
    );
    println!("|---:|---:|---:|---:|");
    let mut size = 1000;
    while size <= args.entries {
        let inclusion = store.kt_inclusion(size / 3, size)?.len();
        let consistent = store.kt_consistency(size / 2, size)?.len();
        println!(
            "| {size} | {inclusion} | {} | {consistent} |",
            inclusion * 32
        );
        size *= 10;
    }
    println!("\nlargest sampled inclusion proof at full size: {path_bytes} bytes");

    store.close().await?;
    let on_disk = dir_size(dir.path())?;
    println!(
        "- storage at {} entries: {:.1} MiB on disk ({:.0} bytes per entry, directory and tree hashes included)",
        args.entries,
        on_disk as f64 / (1024.0 * 1024.0),
        on_disk as f64 / args.entries as f64
    );
    Ok(())
}

/// Picks sample `i` of `n` items spread over the whole range.
fn spread(i: u64, n: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) % n
}

/// Builds the registration of entry `index`: device `index` of account `index / per_account`.
fn registration(index: u64, per_account: u64) -> (KeyEvent, DeviceRecord) {
    let key = device_key(index);
    let device = DeviceId::for_key(&key);
    let account = format!("user{}", index / per_account);
    let event = KeyEvent {
        kind: KeyEventKind::Added,
        account: account.clone(),
        device,
        key: key.to_vec(),
        time_ms: index,
        authorization: Authorization::LoginSignature {
            server_name: "localhost".into(),
            nonce: vec![0; 32],
            signature: vec![0; 64],
        },
    };
    let record = DeviceRecord {
        device,
        account,
        public_key: key.to_vec(),
        registered_at_ms: index,
        kt_index: None,
        revoked_at_ms: None,
    };
    (event, record)
}

fn device_key(index: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&index.to_be_bytes());
    key
}

fn device_id(index: u64) -> DeviceId {
    DeviceId::for_key(&device_key(index))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dir_size(path: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
