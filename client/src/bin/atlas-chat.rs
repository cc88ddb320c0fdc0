//! `atlas-chat`: the command-line chat client, built on the `atlas-client` SDK.
//!
//! Each subcommand opens the client state directory, does one action and exits. Commands that
//! need the server connect and log in first, and the first login registers the device.
//! `interactive` keeps one connection open, sends the lines it reads from stdin and prints the
//! server's pushes as they arrive.
//!
//! Standard output carries events and results, one per line. Standard error carries notes and
//! errors. Text from other members is printed with its control characters escaped, so that a
//! message cannot add lines or send terminal escape sequences.

use atlas_client::accounts::AccountSession;
use atlas_client::{
    Client, ClientError, EnrollmentRequest, Event, NodeAddress, RawConnection, Received,
    ServerTrust, audit,
};
use atlas_protocol::receipts::SignedReceipt;
use atlas_protocol::transparency::Jwks;
use atlas_protocol::{ClientBody, DeviceId, ErrorCode, GroupId, ServerBody};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::fs::{File, TryLockError};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;
use webauthn_authenticator_rs::softtoken::SoftToken;

/// Writes a line to stdout like `println!`, but a closed stdout (as with `atlas-chat ... |
/// head -1`) ends the program quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        write_stdout_line(format_args!($($arg)*))
    };
}

fn write_stdout_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("atlas-chat: writing to stdout failed: {e}");
        std::process::exit(1);
    }
}

const DEFAULT_SERVER: &str = "wss://localhost:8443/v1/ws";

/// Maximum length of an account name in bytes, as the server enforces it.
const MAX_ACCOUNT_LEN: usize = 64;

/// Maximum length of a group name in bytes. The SDK forms the group id from the name, `-` and
/// 16 hex digits, and a group id may be at most [`GroupId::MAX_LEN`] bytes.
const MAX_GROUP_NAME_LEN: usize = GroupId::MAX_LEN - 17;

/// Maximum number of one-time KeyPackages in one upload, as the server enforces it.
const MAX_KEY_PACKAGES: u16 = atlas_protocol::MAX_KEY_PACKAGES_PER_UPLOAD as u16;

/// Maximum time that `interactive` waits for a stdin line before it checks for pushes again.
const STDIN_POLL: Duration = Duration::from_millis(200);

/// Time that `interactive` waits for pushes after each stdin poll.
const RECEIVE_WAIT: Duration = Duration::from_millis(50);

/// Name of the lock file in the state directory, which [`lock_state_dir`] locks.
const LOCK_FILE: &str = "atlas-chat.lock";

const UNKNOWN_GROUP_HINT: &str = "run `atlas-chat groups` to list the groups of this device, \
     or `atlas-chat sync` to join groups that others added it to";

const INTERACTIVE_HELP: &str = "\
commands:
  /create NAME        create a group and make it the current group
  /join               join groups from pending Welcomes and read every group
  /add ACCOUNT...     add accounts to the current group
  /remove ACCOUNT...  remove accounts from the current group
  /group GROUP_HEX    select the current group
  /groups             list the groups of this device
  /help               print this list
  /quit               end the session (so does end of input)
any other line is sent to the current group; start a line with // to send a text that \
begins with /";

#[derive(Parser)]
#[command(
    name = "atlas-chat",
    version,
    about = "Atlas end-to-end-encrypted group chat client",
    after_help = "Commands that connect need exactly one of --fingerprint and --ca. A flag \
                  overrides its environment variable and the other trust option's one. \
                  ATLAS_CHAT_LOG sets the log filter for SDK logs on stderr (default warn)."
)]
struct Cli {
    /// Client state directory, which contains the device key, the MLS group state, cursors and
    /// transcripts.
    #[arg(long, env = "ATLAS_CHAT_STATE", value_name = "DIR", global = true)]
    state: Option<PathBuf>,

    /// Account name: 1 to 64 characters of a-z, 0-9, '.', '_' and '-'.
    #[arg(long, env = "ATLAS_CHAT_ACCOUNT", value_name = "NAME", global = true)]
    account: Option<String>,

    /// WebSocket URL of the node. Several nodes of one cluster may be given, separated by
    /// commas: a command connects to the first that accepts, and a send moves to another
    /// node when its node fails. Their certificates then verify with --ca, or with one
    /// --fingerprint per node, in the same order.
    #[arg(
        long,
        env = "ATLAS_CHAT_SERVER",
        value_name = "URL",
        default_value = DEFAULT_SERVER,
        global = true
    )]
    server: String,

    /// SHA-256 fingerprint of the server certificate in hex, as `atlas node` prints it. With
    /// several nodes in --server, one per node, separated by commas in the same order.
    #[arg(
        long,
        env = "ATLAS_CHAT_FINGERPRINT",
        value_name = "HEX",
        global = true
    )]
    fingerprint: Option<String>,

    /// PEM file with the CA certificates that verify the server certificate.
    #[arg(long, env = "ATLAS_CHAT_CA", value_name = "FILE", global = true)]
    ca: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect, which registers this device on its first login, and upload KeyPackages.
    Register {
        /// Number of one-time KeyPackages to upload, in addition to one last-resort KeyPackage.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 20,
            value_parser = clap::value_parser!(u16).range(0..=i64::from(MAX_KEY_PACKAGES))
        )]
        key_packages: u16,
    },
    /// Create the account with a new software passkey, saved unencrypted to a file, and
    /// enroll this device with the login's access token. For development: a real application
    /// uses the platform's authenticator (see the node's /login page).
    Signup {
        /// File for the software passkey [default: soft-passkey.cbor in the state directory].
        #[arg(long, value_name = "FILE")]
        passkey: Option<PathBuf>,
    },
    /// Log in to the account with the software passkey file that `signup` wrote, and enroll
    /// this device with the login's access token.
    PasskeyEnroll {
        /// Software passkey file of the account.
        #[arg(long, value_name = "FILE")]
        passkey: PathBuf,
    },
    /// Create a group with this device as its only member and print the group id in hex.
    CreateGroup {
        /// Group name of 1 to 47 bytes. The group id is the name, '-' and 16 random hex digits.
        name: String,
    },
    /// Add every device of each account to a group.
    Add {
        /// Group id in hex.
        #[arg(value_parser = parse_group_id)]
        group: GroupId,
        /// Accounts to add.
        #[arg(required = true)]
        accounts: Vec<String>,
    },
    /// Remove every device of each account from a group.
    Remove {
        /// Group id in hex.
        #[arg(value_parser = parse_group_id)]
        group: GroupId,
        /// Accounts to remove.
        #[arg(required = true)]
        accounts: Vec<String>,
    },
    /// Send a text message to a group.
    Send {
        /// Group id in hex.
        #[arg(value_parser = parse_group_id)]
        group: GroupId,
        /// Message text.
        text: String,
    },
    /// Join groups from pending Welcomes, read every group from its cursor and print each
    /// event as one line.
    Sync,
    /// List the groups of this device with their cursor and members, without connecting.
    Groups,
    /// Print the stored messages of a group, without connecting.
    History {
        /// Group id in hex.
        #[arg(value_parser = parse_group_id)]
        group: GroupId,
    },
    /// Print the current devices of an account, each proved against the key transparency log.
    Lookup {
        /// Account to look up (any account, not only this device's).
        #[arg(value_name = "ACCOUNT")]
        target: String,
    },
    /// On a new device: write the request to join its account as JSON, for a device of the
    /// account to pass to `enroll` within 10 minutes. Connects only to read the server name.
    EnrollRequest,
    /// Add a new device to this device's account from its `enroll-request` JSON file.
    Enroll {
        /// The new device's enrollment request file.
        file: PathBuf,
    },
    /// Revoke a device of this account (another one, or this one).
    Revoke {
        /// Device id in hex (32 digits), as `lookup` prints it.
        #[arg(value_parser = parse_device_id)]
        device: DeviceId,
    },
    /// Print the receipt of an entry as JSON: the one this device kept for its own message,
    /// or with --fetch a freshly signed one for any entry of a group it belongs to.
    Receipt {
        /// Group id in hex.
        #[arg(value_parser = parse_group_id)]
        group: GroupId,
        /// Sequence number of the entry.
        seq: u64,
        /// Ask the node to sign a receipt instead of printing the kept one.
        #[arg(long)]
        fetch: bool,
    },
    /// Verify a receipt file offline against the node's JWKS and report why a bad one fails.
    /// Needs no account or state directory.
    VerifyReceipt {
        /// Receipt JSON, as `atlas-chat receipt` prints it.
        file: PathBuf,
        /// JWKS: a JSON file, or the node's wss:// URL (verified with --fingerprint or --ca).
        #[arg(long, value_name = "FILE_OR_URL")]
        jwks: String,
        /// Also check that the receipt's content digest matches this ciphertext file.
        #[arg(long, value_name = "FILE")]
        ciphertext: Option<PathBuf>,
    },
    /// Audit the node's key transparency log: check every signed tree head against the one
    /// before, every entry's inclusion proof and every entry's authorisation. Needs no
    /// account or state directory; exits non-zero on the first inconsistency.
    Audit {
        /// First log entry to check; the history of accounts seen later is still replayed.
        #[arg(long, value_name = "SIZE", default_value_t = 0)]
        from: u64,
        /// Keep following the log, polling for a new head every SECS seconds.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        follow: Option<u64>,
        /// With --follow, stop after N polls.
        #[arg(long, value_name = "N", requires = "follow", value_parser = clap::value_parser!(u32).range(1..))]
        polls: Option<u32>,
        /// JSON file that keeps the last verified tree head between runs, so that a log
        /// rolled back or forked between runs is detected.
        #[arg(long, value_name = "FILE")]
        audit_state: Option<PathBuf>,
    },
    /// Connect once, send the lines read from stdin and print messages as they arrive.
    Interactive {
        /// Group to select at the start, in hex.
        #[arg(long, value_parser = parse_group_id)]
        group: Option<GroupId>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_tracing();
    match run(cli, &matches).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            e.print();
            ExitCode::from(e.exit_code)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATLAS_CHAT_LOG")
        // webauthn-authenticator-rs logs its own ERROR lines for failures that atlas-chat
        // reports itself.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,webauthn_authenticator_rs=off")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli, matches: &ArgMatches) -> Result<(), CliError> {
    if let Command::Audit {
        from,
        follow,
        polls,
        audit_state,
    } = &cli.command
    {
        let server = Options::server_of(&cli.server, trust_choice(&cli, matches))?;
        let options = audit::AuditOptions {
            from: *from,
            follow: follow.map(Duration::from_secs),
            max_polls: *polls,
            state_file: audit_state.clone(),
        };
        return audit::audit(&server.url, &server.trust, &options, |line| {
            outln!("{line}")
        })
        .await
        .map(|report| {
            if report.unverified_grants > 0 {
                outln!(
                    "note: {} passkey grants were signed by node keys no longer in the JWKS, so \
                     only their new keys' signatures were checked",
                    report.unverified_grants
                );
            }
        })
        .map_err(|e| {
            let exit_code = if e.is_evidence() {
                EVIDENCE_EXIT_CODE
            } else {
                1
            };
            let hint = match e {
                audit::AuditError::Connect(_) => {
                    "check that the node is running, that --server is its address and that \
                     the trust options match its certificate"
                }
                audit::AuditError::State { .. } => {
                    "the --audit-state file could not be used, which says nothing about the \
                     node: do what the message says, or give a new file"
                }
                audit::AuditError::Options(_) => "change the options the message names",
                _ => {
                    "an inconsistent log is evidence of a misbehaving node: keep the output and \
                     the --audit-state file"
                }
            };
            let mut error =
                CliError::new(format!("audit of {} failed: {e}", server.url)).hint(hint);
            error.exit_code = exit_code;
            error
        });
    }
    if let Command::VerifyReceipt {
        file,
        jwks,
        ciphertext,
    } = &cli.command
    {
        return verify_receipt(&cli, matches, file, jwks, ciphertext.as_deref()).await;
    }
    let options = Options::resolve(&cli, matches)?;
    match cli.command {
        Command::Register { key_packages } => register(&options, key_packages).await,
        Command::Signup { passkey } => {
            let file = passkey.unwrap_or_else(|| options.state.join(SOFT_PASSKEY_FILE));
            passkey_enroll(&options, &file, true).await
        }
        Command::PasskeyEnroll { passkey } => passkey_enroll(&options, &passkey, false).await,
        Command::CreateGroup { name } => {
            validate_group_name(&name)?;
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.connect(&server).await?;
            let group = chat.create_group(&name).await?;
            outln!("{group}");
            Ok(())
        }
        Command::Add { group, accounts } => {
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.require_group(&group)?;
            chat.connect(&server).await?;
            chat.add(&group, &accounts).await
        }
        Command::Remove { group, accounts } => {
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.require_group(&group)?;
            chat.connect(&server).await?;
            chat.remove(&group, &accounts).await
        }
        Command::Send { group, text } => {
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.require_group(&group)?;
            chat.connect(&server).await?;
            chat.send(&group, &text).await
        }
        Command::Sync => {
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.connect(&server).await?;
            chat.sync().await?;
            chat.require_no_conflicts()
        }
        Command::Groups => {
            let chat = Chat::open_existing(&options)?;
            if chat.print_groups(None) == 0 {
                eprintln!(
                    "this device belongs to no group; create one with `atlas-chat create-group \
                     NAME`, or run `atlas-chat sync` to join groups that others added it to"
                );
            }
            Ok(())
        }
        Command::History { group } => {
            let chat = Chat::open_existing(&options)?;
            chat.print_history(&group)
        }
        Command::Lookup { target } => {
            validate_account(&target)?;
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.connect(&server).await?;
            chat.lookup(&target).await
        }
        Command::EnrollRequest => {
            let server = options.server()?;
            let server_name = atlas_client::server_name_of(&server.url, &server.trust)
                .await
                .map_err(|e| sdk_error(&format!("connecting to {}", server.url), e))?;
            let client = Client::open(&options.state, &options.account)
                .map_err(|e| sdk_error("opening the client state", e))?;
            let request = client
                .enrollment_request(&server_name)
                .map_err(|e| sdk_error("signing the enrollment request", e))?;
            let json = serde_json::to_string_pretty(&request)
                .map_err(|e| CliError::new(format!("encoding the request failed: {e}")))?;
            outln!("{json}");
            eprintln!(
                "pass this to `atlas-chat enroll FILE` on a device of {} within 10 minutes, then \
                 run `atlas-chat register` here",
                options.account
            );
            Ok(())
        }
        Command::Enroll { file } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| CliError::new(format!("cannot read {}: {e}", file.display())))?;
            let request: EnrollmentRequest = serde_json::from_slice(&bytes).map_err(|e| {
                CliError::new(format!(
                    "{} is not an enrollment request: {e}",
                    file.display()
                ))
                .hint("pass the JSON that `atlas-chat enroll-request` printed on the new device")
            })?;
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.connect(&server).await?;
            let index = chat
                .client
                .enroll_device(&request)
                .await
                .map_err(|e| sdk_error("enrolling the device", e))?;
            outln!(
                "device {} enrolled by key log entry {index}",
                DeviceId::for_key(&request.key)
            );
            Ok(())
        }
        Command::Revoke { device } => {
            let server = options.server()?;
            let mut chat = Chat::open_existing(&options)?;
            chat.connect(&server).await?;
            chat.revoke(device).await
        }
        Command::Receipt { group, seq, fetch } => {
            let mut chat = Chat::open_existing(&options)?;
            chat.require_group(&group)?;
            let receipt = if fetch {
                let server = options.server()?;
                chat.connect(&server).await?;
                chat.client
                    .fetch_receipt(&group, seq)
                    .await
                    .map_err(|e| sdk_error(&format!("fetching the receipt of entry {seq}"), e))?
            } else {
                chat.client.receipt(&group, seq).cloned().ok_or_else(|| {
                    CliError::new(format!(
                        "this device kept no receipt for entry {seq} of group {group}"
                    ))
                    .hint(
                        "receipts are kept for this device's own messages; use --fetch for others",
                    )
                })?
            };
            let json = serde_json::to_string_pretty(&receipt)
                .map_err(|e| CliError::new(format!("encoding the receipt failed: {e}")))?;
            outln!("{json}");
            Ok(())
        }
        Command::Audit { .. } | Command::VerifyReceipt { .. } => {
            unreachable!("handled before the options are resolved")
        }
        Command::Interactive { group } => interactive(&options, group).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Options and errors
// ---------------------------------------------------------------------------------------------

/// Global options after flags and environment variables are merged.
struct Options {
    state: PathBuf,
    account: String,
    server: String,
    trust: TrustChoice,
}

/// The server trust option in effect, before it is parsed.
#[derive(Clone)]
enum TrustChoice {
    Missing,
    /// Both options are set at the same level: both as flags, or both from the environment.
    Conflict,
    Fingerprint(String),
    CaFile(PathBuf),
}

/// The node to connect to and how to verify it.
struct Server {
    /// The first node of `--server`, the only one for commands that use one node.
    url: String,
    trust: ServerTrust,
    /// The other nodes of `--server`, in order, each with its trust.
    others: Vec<NodeAddress>,
}

impl Options {
    fn resolve(cli: &Cli, matches: &ArgMatches) -> Result<Self, CliError> {
        let state = cli.state.clone().ok_or_else(|| {
            CliError::new("no client state directory is set")
                .hint("pass --state DIR or set ATLAS_CHAT_STATE")
        })?;
        let account = cli.account.clone().ok_or_else(|| {
            CliError::new("no account is set").hint("pass --account NAME or set ATLAS_CHAT_ACCOUNT")
        })?;
        validate_account(&account)?;
        Ok(Self {
            state,
            account,
            server: cli.server.clone(),
            trust: trust_choice(cli, matches),
        })
    }

    /// Checks the server URL and the trust option, which every command that connects needs.
    fn server(&self) -> Result<Server, CliError> {
        Self::server_of(&self.server, self.trust.clone())
    }

    fn server_of(urls: &str, trust: TrustChoice) -> Result<Server, CliError> {
        let mut urls = urls.split(',').map(str::trim);
        let url = urls.next().unwrap_or_default();
        let others: Vec<String> = urls.map(str::to_owned).collect();
        for url in std::iter::once(url).chain(others.iter().map(String::as_str)) {
            if !url.starts_with("wss://") {
                return Err(CliError::new(format!(
                    "invalid server URL {url:?}: the node accepts TLS connections only"
                ))
                .hint(format!(
                    "pass a wss:// URL such as --server {DEFAULT_SERVER}, or several separated \
                     by commas"
                )));
            }
        }
        let count = 1 + others.len();
        let trusts: Vec<ServerTrust> = match &trust {
            TrustChoice::Missing => {
                return Err(CliError::new(
                    "no server trust option is set, so the server cannot be verified",
                )
                .hint(
                    "pass --fingerprint HEX with the certificate fingerprint that `atlas node` \
                     prints at start, or --ca FILE with a PEM CA file (or set \
                     ATLAS_CHAT_FINGERPRINT or ATLAS_CHAT_CA)",
                ));
            }
            TrustChoice::Conflict => {
                return Err(CliError::new(
                    "both a certificate fingerprint and a CA file are set as server trust",
                )
                .hint(
                    "pass only one of --fingerprint and --ca, or set only one of \
                     ATLAS_CHAT_FINGERPRINT and ATLAS_CHAT_CA",
                ));
            }
            TrustChoice::Fingerprint(text) => {
                let fingerprints: Vec<&str> = text.split(',').map(str::trim).collect();
                if fingerprints.len() != count {
                    return Err(CliError::new(format!(
                        "--server names {count} {} but --fingerprint has {} {}",
                        if count == 1 { "node" } else { "nodes" },
                        fingerprints.len(),
                        if fingerprints.len() == 1 {
                            "fingerprint"
                        } else {
                            "fingerprints"
                        }
                    ))
                    .hint(
                        "pass one fingerprint per node, separated by commas in the order of \
                         --server, or --ca with the CA that issued the nodes' certificates",
                    ));
                }
                let mut trusts = Vec::with_capacity(count);
                for fingerprint in fingerprints {
                    trusts.push(ServerTrust::fingerprint(fingerprint).map_err(|e| {
                        CliError::new(format!("invalid --fingerprint {fingerprint:?}: {e}")).hint(
                            "pass the 64 hex digits that `atlas node` prints after \
                             'certificate sha256 fingerprint:'",
                        )
                    })?);
                }
                trusts
            }
            TrustChoice::CaFile(path) => {
                let problem = match std::fs::metadata(path) {
                    Ok(meta) if meta.is_file() => None,
                    Ok(_) => Some("is not a regular file".to_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Some("does not exist".to_owned())
                    }
                    Err(e) => Some(format!("cannot be read: {e}")),
                };
                if let Some(problem) = problem {
                    return Err(
                        CliError::new(format!("CA file {} {problem}", path.display())).hint(
                            "pass --ca with the PEM file of the CA that issued the server \
                             certificate",
                        ),
                    );
                }
                vec![ServerTrust::CaFile(path.clone()); count]
            }
        };
        let mut trusts = trusts.into_iter();
        let trust = trusts
            .next()
            .expect("one trust per node, and at least one node");
        let others = others
            .into_iter()
            .zip(trusts)
            .map(|(url, trust)| NodeAddress { url, trust })
            .collect();
        Ok(Server {
            url: url.to_owned(),
            trust,
            others,
        })
    }
}

/// Picks the server trust option: a flag wins over an environment variable.
fn trust_choice(cli: &Cli, matches: &ArgMatches) -> TrustChoice {
    let from_flag = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    match (&cli.fingerprint, &cli.ca) {
        (Some(fingerprint), Some(ca)) => match (from_flag("fingerprint"), from_flag("ca")) {
            (true, false) => TrustChoice::Fingerprint(fingerprint.clone()),
            (false, true) => TrustChoice::CaFile(ca.clone()),
            _ => TrustChoice::Conflict,
        },
        (Some(fingerprint), None) => TrustChoice::Fingerprint(fingerprint.clone()),
        (None, Some(ca)) => TrustChoice::CaFile(ca.clone()),
        (None, None) => TrustChoice::Missing,
    }
}

/// An error as the user sees it: what failed on which value, and what to do next.
#[derive(Debug)]
struct CliError {
    message: String,
    hint: Option<String>,
    /// True when the connection or the state directory can no longer be used, which ends an
    /// `interactive` session.
    fatal: bool,
    /// Exit status of the process: 1, or [`EVIDENCE_EXIT_CODE`] for an audit that found
    /// evidence against the node.
    exit_code: u8,
}

/// Exit status of `audit` when it found a log inconsistency or a bad entry, so that scripts
/// can tell it apart from a lost connection (status 1).
const EVIDENCE_EXIT_CODE: u8 = 3;

impl CliError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            fatal: false,
            exit_code: 1,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn print(&self) {
        eprintln!("atlas-chat: {}", self.message);
        if let Some(hint) = &self.hint {
            eprintln!("hint: {hint}");
        }
    }
}

/// Converts a failed SDK call into a [`CliError`] with a hint. `action` names what failed and on which value, for example
/// "sending to group 6162".
fn sdk_error(action: &str, error: ClientError) -> CliError {
    let fatal = matches!(
        error,
        ClientError::Disconnected(_) | ClientError::NotConnected | ClientError::State { .. }
    );
    let (detail, hint) = match &error {
        ClientError::Server { code, message, .. } => (
            format!(
                "the server rejected the request with {} ({}): {message}",
                code.name(),
                code.as_u16()
            ),
            server_error_hint(*code).map(str::to_owned),
        ),
        ClientError::Connect(detail) => (detail.clone(), Some(connect_hint(detail).to_owned())),
        ClientError::Disconnected(close) => (describe_close(close), Some(close_hint(close))),
        ClientError::Timeout(_) => (
            "the server did not respond in time".to_owned(),
            Some("retry; if it keeps failing, check that the node is running".to_owned()),
        ),
        ClientError::UnknownGroup(group) => (
            format!("group {group} is not known to this device"),
            Some(UNKNOWN_GROUP_HINT.to_owned()),
        ),
        ClientError::State { .. } => (
            error.to_string(),
            Some("check that the --state directory exists and is writable".to_owned()),
        ),
        ClientError::Security(_) => (
            error.to_string(),
            Some(
                "this device no longer talks to the server; report both tree heads above to \
                 its operator"
                    .to_owned(),
            ),
        ),
        ClientError::LogConflict(_) => (
            error.to_string(),
            Some(
                "the node lost messages it had acknowledged (a restored backup or a damaged \
                 disk); report this to its operator. This device keeps everything it read, \
                 and reads and writes this group no more"
                    .to_owned(),
            ),
        ),
        ClientError::Http(_) => {
            let detail = error.to_string();
            let hint = dpop_url_hint(&detail);
            (detail, hint)
        }
        _ => (error.to_string(), None),
    };
    CliError {
        message: format!("{action} failed: {detail}"),
        hint,
        fatal,
        exit_code: 1,
    }
}

fn server_error_hint(code: ErrorCode) -> Option<&'static str> {
    let hint = match code {
        ErrorCode::GroupNotFound => "check the group id with `atlas-chat groups`",
        ErrorCode::NotMember => {
            "this device is not in the group's roster; run `atlas-chat sync` to see whether it \
             was removed"
        }
        ErrorCode::StaleEpoch => {
            "other members changed the group at the same time; run `atlas-chat sync` and retry"
        }
        ErrorCode::NoKeyPackage => {
            "the account has no KeyPackage left; its owner must run `atlas-chat register` again"
        }
        ErrorCode::DeviceNotFound => "the account's owner must run `atlas-chat register` first",
        ErrorCode::DeviceNotEnrolled => {
            "this device is in no account: run `atlas-chat signup` to create the account with a \
             passkey, `atlas-chat passkey-enroll --passkey FILE` to add it with the account's \
             passkey, or `atlas-chat enroll-request` for a device of the account to approve"
        }
        ErrorCode::DeviceRevoked => {
            "the device was revoked; create a new device with a new --state directory"
        }
        ErrorCode::InvalidAccount => {
            "account names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-', and a device \
             key stays with the account it first registered under; to add a device to an \
             existing account, run `atlas-chat enroll-request` on it and `atlas-chat enroll \
             FILE` on a device of the account"
        }
        ErrorCode::TooLarge => {
            "send a shorter message: one MLS message may be at most 204,800 bytes"
        }
        ErrorCode::Unavailable => {
            "the server is busy, shutting down or cut off from its cluster; retry later. If \
             this was a send, a cluster node may still store the message: run `atlas-chat \
             sync` before sending the same text again"
        }
        ErrorCode::StorageFailure | ErrorCode::Internal => {
            "retry; if it keeps failing, check the node's logs"
        }
        _ => return None,
    };
    Some(hint)
}

/// Returns a hint for a DPoP proof refused because it names another URL than the node's:
/// the node checks the URL under its own server name, whatever other names its certificate
/// has.
fn dpop_url_hint(detail: &str) -> Option<String> {
    let (_, expected) = detail.split_once("but the request is ")?;
    let expected = expected.split_whitespace().next()?;
    let url = expected.replacen("https://", "wss://", 1);
    Some(format!(
        "name the node by its server name, as in --server {url}; other names in its \
         certificate pass TLS but not the DPoP check"
    ))
}

fn connect_hint(detail: &str) -> &'static str {
    if detail.contains("fingerprint") {
        "compare --fingerprint with the fingerprint that `atlas node` printed at start"
    } else if detail.contains("CA file") || detail.contains("certificate") {
        "check that --ca names a PEM file with the CA that issued the server certificate"
    } else {
        "check that the node is running and that --server is its address"
    }
}

fn describe_close(close: &Option<(u16, String)>) -> String {
    match close {
        Some((code, reason)) if reason.is_empty() => {
            format!("the server closed the connection with code {code}")
        }
        Some((code, reason)) => {
            format!("the server closed the connection with code {code} ({reason})")
        }
        None => "the connection closed without a close frame".to_owned(),
    }
}

fn close_hint(close: &Option<(u16, String)>) -> String {
    let hint = match close.as_ref().map(|(code, _)| *code) {
        Some(1001) => "the server is shutting down; run the command again when it is back",
        Some(1009) => "a frame exceeded 262,144 bytes; send a shorter message",
        Some(4001) => "the login failed; check --account and --state",
        Some(4008) => {
            "this client read too slowly; run the command again, which reads the log from the \
             stored cursor"
        }
        Some(4009) => {
            "this device logged in on another connection, for example from a copy of this \
             state directory; only one client per device can be connected"
        }
        _ => "run the command again; it continues from the stored cursor",
    };
    hint.to_owned()
}

/// Checks an account name against the server's rule, so that a typo fails with a clear message
/// before the name reaches the server.
fn validate_account(name: &str) -> Result<(), CliError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(
            CliError::new(format!("invalid account name {:?}", escape_controls(name)))
                .hint("use 1 to 64 characters of a-z, 0-9, '.', '_' and '-'"),
        )
    }
}

fn validate_group_name(name: &str) -> Result<(), CliError> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME_LEN {
        return Err(CliError::new(format!(
            "invalid group name {:?} of {} bytes",
            escape_controls(name),
            name.len()
        ))
        .hint(format!(
            "use 1 to {MAX_GROUP_NAME_LEN} bytes, because the group id adds 17 bytes and may be \
             at most {} bytes",
            GroupId::MAX_LEN
        )));
    }
    Ok(())
}

/// Verifies a receipt file against a JWKS file or the JWKS of a node, offline for a file.
async fn verify_receipt(
    cli: &Cli,
    matches: &ArgMatches,
    file: &Path,
    jwks_source: &str,
    ciphertext: Option<&Path>,
) -> Result<(), CliError> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| CliError::new(format!("cannot read {what} {}: {e}", path.display())))
    };
    let signed: SignedReceipt =
        serde_json::from_slice(&read(file, "receipt file")?).map_err(|e| {
            CliError::new(format!("{} is not a receipt: {e}", file.display()))
                .hint("pass the JSON that `atlas-chat receipt GROUP SEQ` prints")
        })?;
    let jwks: Jwks = if jwks_source.starts_with("wss://") {
        let server = Options::server_of(jwks_source, trust_choice(cli, matches))?;
        let (conn, _) = RawConnection::open(&server.url, &server.trust)
            .await
            .map_err(|e| sdk_error(&format!("connecting to {jwks_source}"), e))?;
        match conn.request(ClientBody::Jwks).await {
            Ok(ServerBody::Jwks(jwks)) => jwks,
            Ok(other) => {
                return Err(CliError::new(format!(
                    "{jwks_source} responded to the JWKS request with {}",
                    other_type(&other)
                )));
            }
            Err(e) => return Err(sdk_error(&format!("fetching the JWKS of {jwks_source}"), e)),
        }
    } else {
        serde_json::from_slice(&read(Path::new(jwks_source), "JWKS file")?).map_err(|e| {
            CliError::new(format!("{jwks_source} is not a JWKS: {e}"))
                .hint("save the node's /.well-known/jwks.json, or pass its wss:// URL")
        })?
    };
    signed.verify(&jwks).map_err(|e| {
        CliError::new(format!(
            "receipt of entry {} in group {} is invalid: {e}",
            signed.fields.seq, signed.fields.group
        ))
    })?;
    if let Some(path) = ciphertext {
        signed
            .fields
            .check_ciphertext(&read(path, "ciphertext file")?)
            .map_err(|e| {
                CliError::new(format!("receipt does not match {}: {e}", path.display()))
            })?;
    }
    outln!(
        "receipt valid: entry {} of group {} from device {} accepted at {} ms",
        signed.fields.seq,
        signed.fields.group,
        signed.fields.sender,
        signed.fields.accepted_at_ms
    );
    Ok(())
}

/// Names a response type for messages.
fn other_type(body: &ServerBody) -> String {
    format!("{body:?}").chars().take(40).collect()
}

/// Parses a device id of 32 hex digits.
fn parse_device_id(text: &str) -> Result<DeviceId, String> {
    DeviceId::from_hex(text).map_err(|e| {
        format!("not a device id ({e}); use an id that `atlas-chat lookup ACCOUNT` prints")
    })
}

/// Parses a group id in the hex form that `GroupId`'s `Display` prints.
fn parse_group_id(text: &str) -> Result<GroupId, String> {
    GroupId::from_hex(text)
        .map_err(|e| format!("not a hex group id ({e}); use an id that `atlas-chat groups` lists"))
}

// ---------------------------------------------------------------------------------------------
// Output lines
// ---------------------------------------------------------------------------------------------

/// Escapes control characters such as `\n`, `\t` and ESC, so that text from other members
/// prints as one line and cannot send terminal escape sequences.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Formats a message as `GROUP_HEX SEQ ACCOUNT: TEXT`.
fn message_line(group: &GroupId, seq: u64, account: &str, text: &str) -> String {
    format!(
        "{group} {seq} {}: {}",
        escape_controls(account),
        escape_controls(text)
    )
}

/// Formats a group event other than a message as `GROUP_HEX SEQ * NOTICE`. Account names
/// never contain `*`, so the marker cannot be mistaken for a sender.
fn notice_line(group: &GroupId, seq: u64, notice: &str) -> String {
    format!("{group} {seq} * {notice}")
}

fn event_line(received: &Received, me: &str) -> String {
    let Received {
        group,
        seq,
        sender_account,
        ..
    } = received;
    match &received.event {
        Event::Message(text) => message_line(group, *seq, sender_account, text),
        Event::Joined => notice_line(group, *seq, &format!("{me} joined the group")),
        // Without a sender the server refused a read before this device read its removal.
        Event::Removed if sender_account.is_empty() => notice_line(
            group,
            *seq,
            &format!("{me} is no longer a member; the server rejected reading past this entry"),
        ),
        Event::Removed => notice_line(
            group,
            *seq,
            &format!("{} removed {me}", escape_controls(sender_account)),
        ),
        Event::Membership { added, removed } => notice_line(
            group,
            *seq,
            &membership_notice(sender_account, added, removed),
        ),
        Event::Unreadable(reason) => notice_line(
            group,
            *seq,
            &format!(
                "skipped a message from device {} that cannot be read: {}",
                received.sender,
                escape_controls(reason)
            ),
        ),
    }
}

fn membership_notice(actor: &str, added: &[String], removed: &[String]) -> String {
    let actor = escape_controls(actor);
    let added = account_list(added);
    let removed = account_list(removed);
    match (added.is_empty(), removed.is_empty()) {
        (false, true) => format!("{actor} added {added}"),
        (true, false) => format!("{actor} removed {removed}"),
        (false, false) => format!("{actor} added {added} and removed {removed}"),
        (true, true) => format!("{actor} committed a change without adding or removing members"),
    }
}

/// Joins account names with commas, once each in first-seen order, because an account with
/// several devices appears once per device.
fn account_list(accounts: &[String]) -> String {
    let mut seen: Vec<String> = Vec::new();
    for account in accounts {
        let account = escape_controls(account);
        if !seen.contains(&account) {
            seen.push(account);
        }
    }
    seen.join(",")
}

// ---------------------------------------------------------------------------------------------
// Client actions shared by the subcommands and `interactive`
// ---------------------------------------------------------------------------------------------

/// The client of one state directory, with an exclusive lock on that directory for as long as
/// it lives.
struct Chat {
    client: Client,
    _lock: File,
    /// True once connected with several nodes: sends then move to another node when theirs
    /// fails.
    failover: bool,
}

impl Chat {
    /// Opens the client of an existing state directory. Only `register` creates one, so that a
    /// mistyped `--state` cannot register a new device by accident.
    fn open_existing(options: &Options) -> Result<Self, CliError> {
        if !Client::state_exists(&options.state) {
            return Err(
                CliError::new(format!("no client state in {}", options.state.display()))
                    .hint("run `atlas-chat register` with this --state and --account first"),
            );
        }
        Self::open(options)
    }

    /// Opens the client of the state directory, creating the directory and a new device key
    /// if they do not exist.
    fn open_or_create(options: &Options) -> Result<Self, CliError> {
        std::fs::create_dir_all(&options.state).map_err(|e| {
            CliError::new(format!(
                "creating the state directory {} failed: {e}",
                options.state.display()
            ))
            .hint("pass a --state directory that you can write")
        })?;
        Self::open(options)
    }

    fn open(options: &Options) -> Result<Self, CliError> {
        let lock = lock_state_dir(&options.state)?;
        let action = format!("opening the client state in {}", options.state.display());
        let client = Client::open(&options.state, &options.account).map_err(|e| {
            let wrong_account = matches!(e, ClientError::Config(_));
            let error = sdk_error(&action, e);
            if wrong_account {
                error.hint(
                    "pass the --account that this state directory was registered with, or \
                     another --state directory",
                )
            } else {
                error
            }
        })?;
        Ok(Self {
            client,
            _lock: lock,
            failover: false,
        })
    }

    fn account(&self) -> &str {
        self.client.account()
    }

    /// Connects and logs in. Returns true if this login registered the device.
    async fn connect(&mut self, server: &Server) -> Result<bool, CliError> {
        if !server.others.is_empty() {
            let first = NodeAddress {
                url: server.url.clone(),
                trust: server.trust.clone(),
            };
            let nodes: Vec<NodeAddress> = std::iter::once(first)
                .chain(server.others.iter().cloned())
                .collect();
            let index = self.client.connect_any(&nodes).await.map_err(|e| {
                let action = format!("connecting to any of {} nodes", nodes.len());
                let error = sdk_error(&action, e);
                let hint = dpop_url_hint(&error.message).unwrap_or_else(|| {
                    "check that the nodes run, that --server lists their addresses and that \
                     --ca is the CA of their certificates"
                        .to_owned()
                });
                error.hint(hint)
            })?;
            eprintln!("connected to {}", nodes[index].url);
            self.failover = true;
            return Ok(true);
        }
        let action = format!("connecting to {} as {}", server.url, self.account());
        self.client
            .connect(&server.url, &server.trust)
            .await
            .map_err(|e| {
                let error = sdk_error(&action, e);
                // The SDK reports an unusable CA file as a configuration error, without a hint.
                if error.hint.is_none() {
                    let hint = connect_hint(&error.message);
                    error.hint(hint)
                } else {
                    error
                }
            })
    }

    fn print_events(&self, events: &[Received]) {
        for received in events {
            outln!("{}", event_line(received, self.account()));
        }
    }

    /// Returns an error unless this device is a member of `group`, as its state records it.
    fn require_group(&self, group: &GroupId) -> Result<(), CliError> {
        if self.client.groups().contains(group) {
            Ok(())
        } else if self.client.cursor(group).is_some() {
            Err(
                CliError::new(format!("this device was removed from group {group}"))
                    .hint("ask a member of the group to add this account again"),
            )
        } else {
            Err(
                CliError::new(format!("group {group} is not known to this device"))
                    .hint(UNKNOWN_GROUP_HINT),
            )
        }
    }

    /// Reads the group's log up to its head, prints what arrived and checks that this device is
    /// still a member. Runs before each change to a group, because the SDK catches up before a
    /// commit too but does not return what it read.
    async fn catch_up(&mut self, group: &GroupId) -> Result<(), CliError> {
        self.require_group(group)?;
        let read = if self.failover {
            self.client.sync_group_reliably(group).await
        } else {
            self.client.sync_group(group).await
        };
        self.print_taken_missed(group, 0);
        let events = read.map_err(|e| sdk_error(&format!("reading group {group}"), e))?;
        self.print_events(&events);
        self.require_group(group)
    }

    /// Prints what a failover's sync read in every group, other than this device's own entry
    /// `own_seq` of `group`, and returns the sequence numbers printed for `group`. That sync
    /// moves the cursors, so neither [`Self::print_missed`] nor a later `sync` shows them.
    fn print_taken_missed(&mut self, group: &GroupId, own_seq: u64) -> Vec<u64> {
        let lines = self.take_missed_lines(group, own_seq);
        for (_, line) in &lines {
            outln!("{line}");
        }
        lines.into_iter().map(|(seq, _)| seq).collect()
    }

    /// Like [`Self::print_taken_missed`], but returns the lines of `group` with their
    /// sequence numbers instead of printing them. The other groups' lines print at once.
    fn take_missed_lines(&mut self, group: &GroupId, own_seq: u64) -> Vec<(u64, String)> {
        let missed = self.client.take_missed();
        let mut lines = Vec::new();
        for received in &missed {
            let line = event_line(received, self.account());
            if &received.group != group {
                outln!("{line}");
            } else if received.seq != own_seq {
                lines.push((received.seq, line));
            }
        }
        lines
    }

    /// Prints the messages that an SDK call stored in the transcript after `after`, other than
    /// its own entry at `own_seq`. A send or commit that loses an epoch race reads the log
    /// internally and does not return what it read.
    ///
    /// NOTE: membership changes read that way are not in the transcript, so they are not
    /// printed. `atlas-chat groups` shows the resulting members.
    fn print_missed(&self, group: &GroupId, after: u64, own_seq: u64, printed: &[u64]) {
        for (_, line) in self.missed_lines(group, after, own_seq, printed) {
            outln!("{line}");
        }
    }

    /// Returns the lines that [`Self::print_missed`] prints, with their sequence numbers.
    fn missed_lines(
        &self,
        group: &GroupId,
        after: u64,
        own_seq: u64,
        printed: &[u64],
    ) -> Vec<(u64, String)> {
        self.client
            .transcript(group)
            .into_iter()
            .filter(|(seq, _, _)| *seq > after && *seq != own_seq && !printed.contains(seq))
            .map(|(seq, account, text)| (seq, message_line(group, seq, &account, &text)))
            .collect()
    }

    fn members(&self, group: &GroupId) -> Result<Vec<String>, CliError> {
        self.client
            .members(group)
            .map_err(|e| sdk_error(&format!("listing the members of group {group}"), e))
    }

    async fn create_group(&mut self, name: &str) -> Result<GroupId, CliError> {
        validate_group_name(name)?;
        self.client
            .create_group(name)
            .await
            .map_err(|e| sdk_error(&format!("creating group {:?}", escape_controls(name)), e))
    }

    async fn add(&mut self, group: &GroupId, accounts: &[String]) -> Result<(), CliError> {
        let accounts = unique_accounts(accounts)?;
        self.catch_up(group).await?;
        let members = self.members(group)?;
        if let Some(account) = accounts.iter().find(|a| members.contains(a)) {
            return Err(
                CliError::new(format!("{account} is already a member of group {group}"))
                    .hint("`atlas-chat groups` lists the members of each group"),
            );
        }
        let before = self.client.cursor(group).unwrap_or(0);
        let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
        let seq = self.client.add_members(group, &names).await.map_err(|e| {
            let no_devices = matches!(e, ClientError::NotFound(_));
            let error = sdk_error(&format!("adding {} to group {group}", names.join(",")), e);
            if no_devices {
                error.hint(
                    "check the account name; its owner must run `atlas-chat register` \
                         before others can add it",
                )
            } else {
                error
            }
        })?;
        self.print_missed(group, before, seq, &[]);
        let notice = membership_notice(self.account(), &accounts, &[]);
        outln!("{}", notice_line(group, seq, &notice));
        Ok(())
    }

    async fn lookup(&mut self, account: &str) -> Result<(), CliError> {
        let devices = self
            .client
            .lookup_devices(account)
            .await
            .map_err(|e| sdk_error(&format!("looking up account {account}"), e))?;
        if devices.is_empty() {
            eprintln!("account {account} has no current devices");
        }
        for (device, key) in devices {
            outln!("{device} key {}", hex::encode(key));
        }
        Ok(())
    }

    async fn revoke(&mut self, device: DeviceId) -> Result<(), CliError> {
        let index = self
            .client
            .revoke_device(device)
            .await
            .map_err(|e| sdk_error(&format!("revoking device {device}"), e))?;
        outln!("device {device} revoked by key log entry {index}");
        Ok(())
    }

    async fn remove(&mut self, group: &GroupId, accounts: &[String]) -> Result<(), CliError> {
        let accounts = unique_accounts(accounts)?;
        if accounts.iter().any(|a| a == self.account()) {
            return Err(CliError::new(format!(
                "this client cannot remove its own account {} from group {group}",
                self.account()
            ))
            .hint("ask another member of the group to remove it"));
        }

        self.catch_up(group).await?;
        let members = self.members(group)?;
        if let Some(account) = accounts.iter().find(|a| !members.contains(a)) {
            return Err(
                CliError::new(format!("{account} is not a member of group {group}"))
                    .hint("`atlas-chat groups` lists the members of each group"),
            );
        }

        let before = self.client.cursor(group).unwrap_or(0);
        let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
        let seq = self
            .client
            .remove_members(group, &names)
            .await
            .map_err(|e| {
                sdk_error(
                    &format!("removing {} from group {group}", names.join(",")),
                    e,
                )
            })?;
        self.print_missed(group, before, seq, &[]);
        let notice = membership_notice(self.account(), &[], &accounts);
        outln!("{}", notice_line(group, seq, &notice));
        Ok(())
    }

    async fn send(&mut self, group: &GroupId, text: &str) -> Result<(), CliError> {
        if text.is_empty() {
            return Err(
                CliError::new(format!("the message to group {group} is empty"))
                    .hint("pass the message text as the last argument"),
            );
        }
        // The read before the send and the send itself may each move to another node.
        let node = self.client.current_node().map(|n| n.url.clone());
        self.catch_up(group).await?;
        let before = self.client.cursor(group).unwrap_or(0);
        let sent = if self.failover {
            self.client.send_reliably(group, text).await
        } else {
            self.client.send(group, text).await
        };
        if let (Some(from), Some(now)) = (node, self.client.current_node())
            && from != now.url
        {
            eprintln!("moved from {from} to {} to send", now.url);
        }
        // The group's lines print in the log's order, this device's own line among them.
        // What a failover read is shown even when the send failed in the end.
        let mut lines = self.take_missed_lines(group, *sent.as_ref().unwrap_or(&0));
        let seq = match sent {
            Ok(seq) => seq,
            Err(e) => {
                print_in_order(lines);
                return Err(sdk_error(&format!("sending to group {group}"), e));
            }
        };
        let printed: Vec<u64> = lines.iter().map(|(seq, _)| *seq).collect();
        lines.extend(self.missed_lines(group, before, seq, &printed));
        if self.client.cursor(group).is_some_and(|cursor| cursor < seq) {
            // Others' entries came between the catch-up and this one. Should the read fail,
            // the next one reads them.
            match self.client.sync_group(group).await {
                Ok(read) => lines.extend(
                    read.iter()
                        .filter(|r| r.seq != seq)
                        .map(|r| (r.seq, event_line(r, self.account()))),
                ),
                Err(e) => eprintln!(
                    "cannot read the entries of group {group} before entry {seq} yet ({e}); \
                     they follow with the next read"
                ),
            }
        }
        lines.push((seq, message_line(group, seq, self.account(), text)));
        print_in_order(lines);
        Ok(())
    }

    /// Joins groups from pending Welcomes, reads every group and prints the events. Returns
    /// the number of events.
    async fn sync(&mut self) -> Result<usize, CliError> {
        let before = self.client.groups();
        let events = self
            .client
            .sync()
            .await
            .map_err(|e| sdk_error("syncing", e))?;
        self.print_events(&events);
        self.print_removals(&before, &events);
        Ok(events.len())
    }

    /// Prints a notice for each group of `before` that this device has left without a
    /// [`Event::Removed`] in `events`. That happens when the server rejects reading the log with
    /// `not_member` before the client has read the commit that removed it, so the notice
    /// carries the cursor instead of the commit's sequence number.
    fn print_removals(&self, before: &[GroupId], events: &[Received]) {
        let groups = self.client.groups();
        for group in before {
            let reported = events
                .iter()
                .any(|r| &r.group == group && r.event == Event::Removed);
            if groups.contains(group) || reported {
                continue;
            }
            let cursor = self.client.cursor(group).unwrap_or(0);
            let notice = format!(
                "{} is no longer a member; the server rejected reading past this entry",
                self.account()
            );
            outln!("{}", notice_line(group, cursor, &notice));
        }
    }

    /// Prints one line per group: id, cursor, members and the id as text, with `current`
    /// marked. Returns the number of groups.
    /// Fails when the server's log of a group contradicted this device (the SDK's sync leaves
    /// such groups out), naming each group and what contradicted it.
    fn require_no_conflicts(&self) -> Result<(), CliError> {
        let conflicts: Vec<String> = self
            .client
            .groups()
            .iter()
            .filter_map(|g| {
                self.client
                    .log_conflict(g)
                    .map(|c| format!("group {g}: {c}"))
            })
            .collect();
        if conflicts.is_empty() {
            return Ok(());
        }
        Err(CliError::new(format!(
            "not read, because the server's log contradicts this device: {}",
            conflicts.join("; ")
        ))
        .hint(
            "the node lost messages it had acknowledged (a restored backup or a damaged disk); \
             report this to its operator. This device keeps everything it read",
        ))
    }

    fn print_groups(&self, current: Option<&GroupId>) -> usize {
        let groups = self.client.groups();
        for group in &groups {
            let cursor = self.client.cursor(group).unwrap_or(0);
            let members = match self.client.members(group) {
                Ok(members) => account_list(&members),
                Err(e) => format!("unknown ({e})"),
            };
            let text = escape_controls(&String::from_utf8_lossy(group.as_bytes()));
            let marker = if self.client.log_conflict(group).is_some() {
                " [log conflict: not read]"
            } else if current == Some(group) {
                " [current]"
            } else {
                ""
            };
            outln!("{group} cursor {cursor} members {members} ({text}){marker}");
        }
        groups.len()
    }

    /// Prints the stored messages of a group as `SEQ ACCOUNT: TEXT` lines. A group that this
    /// device was removed from keeps its transcript.
    fn print_history(&self, group: &GroupId) -> Result<(), CliError> {
        if self.client.cursor(group).is_none() {
            return Err(
                CliError::new(format!("group {group} is not known to this device"))
                    .hint(UNKNOWN_GROUP_HINT),
            );
        }
        let transcript = self.client.transcript(group);
        if transcript.is_empty() {
            eprintln!("no messages stored for group {group}");
        }
        for (seq, account, text) in transcript {
            outln!(
                "{seq} {}: {}",
                escape_controls(&account),
                escape_controls(&text)
            );
        }
        Ok(())
    }
}

/// Validates account names and drops repeats, keeping the first-seen order.
fn unique_accounts(accounts: &[String]) -> Result<Vec<String>, CliError> {
    let mut out: Vec<String> = Vec::new();
    for account in accounts {
        validate_account(account)?;
        if !out.contains(account) {
            out.push(account.clone());
        }
    }
    Ok(out)
}

/// Takes an exclusive lock on the state directory. The SDK rewrites the whole state file after
/// every change, so two processes on one directory would overwrite each other's MLS state. The
/// operating system releases the lock when the process ends, also after a crash.
fn lock_state_dir(dir: &Path) -> Result<File, CliError> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            CliError::new(format!(
                "opening the lock file {} failed: {e}",
                path.display()
            ))
            .hint("check that the --state directory exists and is writable")
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(CliError::new(format!(
            "the state directory {} is in use by another atlas-chat process",
            dir.display()
        ))
        .hint("wait for that process to end, or end it, and run the command again")),
        Err(TryLockError::Error(e)) => Err(CliError::new(format!(
            "locking {} failed: {e}",
            path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Subcommands with several steps
// ---------------------------------------------------------------------------------------------

/// Default name of the software passkey file in the state directory.
const SOFT_PASSKEY_FILE: &str = "soft-passkey.cbor";

/// Creates the account with a new software passkey saved to `file` (`create`), or logs in
/// with the one in `file`, then enrolls this device with the access token.
async fn passkey_enroll(options: &Options, file: &Path, create: bool) -> Result<(), CliError> {
    let server = options.server()?;
    let base =
        AccountSession::base_of(&server.url).map_err(|e| sdk_error("reading --server", e))?;
    let origin = webauthn_authenticator_rs::prelude::Url::parse(&base)
        .map_err(|e| CliError::new(format!("{base} is not a URL: {e}")))?;
    let mut session =
        AccountSession::new(&base, &server.trust).map_err(|e| sdk_error("HTTPS setup", e))?;
    let account = options.account.clone();
    // An existing state directory of another account is rejected before the server account
    // is created. A new one is created only once the passkey step succeeded.
    if Client::state_exists(&options.state) {
        Client::open(&options.state, &account)
            .map_err(|e| sdk_error("opening the client state", e))?;
    }
    if create {
        if file.exists() {
            return Err(CliError::new(format!("{} already exists", file.display()))
                .hint("pass another --passkey FILE, or use `atlas-chat passkey-enroll`"));
        }
        let (mut token, _) = SoftToken::new(true)
            .map_err(|e| CliError::new(format!("creating a software passkey failed: {e:?}")))?;
        let registered = session.register(&account, &mut token, &origin).await;
        match registered {
            Ok(_) => save_soft_passkey(file, &token)?,
            // The server rejected the account, so it stored no copy of this passkey.
            Err(e @ ClientError::Http(_)) => {
                return Err(sdk_error(&format!("creating account {account}"), e));
            }
            // The outcome is unknown: the server may hold the passkey already, so keep it.
            Err(e) => {
                save_soft_passkey(file, &token)?;
                return Err(
                    sdk_error(&format!("creating account {account}"), e).hint(format!(
                        "the software passkey was kept in {}; if the account exists now, run \
                         `atlas-chat passkey-enroll --passkey {}`",
                        file.display(),
                        file.display()
                    )),
                );
            }
        }
        outln!(
            "created account {account} with the software passkey in {}",
            file.display()
        );
    } else {
        let raw = std::fs::read(file)
            .map_err(|e| CliError::new(format!("cannot read {}: {e}", file.display())))?;
        let mut token = SoftToken::from_cbor(&raw).map_err(|e| {
            CliError::new(format!(
                "{} is not a software passkey: {e:?}",
                file.display()
            ))
            .hint("pass the file that `atlas-chat signup` wrote")
        })?;
        let login = session.login(&account, &mut token, &origin).await;
        // The signature counter grew; the server rejects an older copy of it next time.
        save_soft_passkey(file, &token)?;
        match login {
            Ok(_) => {}
            Err(ClientError::Config(detail)) if detail.contains("authenticator failed") => {
                return Err(CliError::new(format!(
                    "the software passkey in {} has no credential for account {account} on \
                     this server",
                    file.display()
                ))
                .hint("pass the passkey file that `atlas-chat signup` wrote for this account"));
            }
            Err(e) => return Err(sdk_error(&format!("passkey login to {account}"), e)),
        }
    }
    let client = Client::open(&options.state, &account)
        .map_err(|e| sdk_error("opening the client state", e))?;
    let server_name = atlas_client::server_name_of(&server.url, &server.trust)
        .await
        .map_err(|e| sdk_error(&format!("connecting to {}", server.url), e))?;
    let request = client
        .enrollment_request(&server_name)
        .map_err(|e| sdk_error("signing the enrollment request", e))?;
    let enrolled = session
        .enroll_device(&request)
        .await
        .map_err(|e| sdk_error("enrolling this device", e))?;
    outln!(
        "enrolled device {} in account {} (key log entry {}); run `atlas-chat register` to \
         log in and upload KeyPackages",
        enrolled.device,
        enrolled.account,
        enrolled.kt_index
    );
    Ok(())
}

/// Writes a software passkey, readable by the owner only, replacing the file atomically.
fn save_soft_passkey(file: &Path, token: &SoftToken) -> Result<(), CliError> {
    let bytes = token
        .to_cbor()
        .map_err(|e| CliError::new(format!("encoding the software passkey failed: {e:?}")))?;
    let partial = file.with_extension("partial");
    let write = || -> std::io::Result<()> {
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        std::fs::rename(&partial, file)
    };
    write().map_err(|e| CliError::new(format!("cannot write {}: {e}", file.display())))
}

async fn register(options: &Options, key_packages: u16) -> Result<(), CliError> {
    let server = options.server()?;
    let mut chat = Chat::open_or_create(options)?;
    let registered = chat.connect(&server).await?;
    let device = chat.client.device_id();
    if registered {
        outln!("registered device {device} for account {}", chat.account());
    } else {
        outln!(
            "device {device} of account {} was already registered",
            chat.account()
        );
    }
    let available = chat
        .client
        .publish_key_packages(usize::from(key_packages))
        .await
        .map_err(|e| sdk_error(&format!("uploading {key_packages} KeyPackages"), e))?;
    outln!(
        "uploaded {key_packages} one-time KeyPackages and a last-resort KeyPackage; the server \
         holds {available} one-time KeyPackages for this device"
    );
    Ok(())
}

/// Next step of an `interactive` session after a line.
enum Flow {
    Continue,
    Quit,
}

async fn interactive(options: &Options, group: Option<GroupId>) -> Result<(), CliError> {
    let server = options.server()?;
    let mut chat = Chat::open_existing(options)?;
    chat.connect(&server).await?;
    chat.sync().await?;
    // Checked after the sync, which joins the groups of pending Welcomes.
    if let Some(group) = &group {
        chat.require_group(group)?;
    }
    let mut current = group;
    eprintln!(
        "connected to {} as {}; type a message for the current group, or /help",
        server.url,
        chat.account()
    );
    let mut lines = spawn_stdin_reader();
    // The loop polls instead of running `receive` inside `tokio::select!`, because dropping
    // `receive` when a line arrives could lose events that it has processed but not returned.
    loop {
        match tokio::time::timeout(STDIN_POLL, lines.recv()).await {
            Ok(None) => break,
            Ok(Some(Ok(line))) => match chat.handle_line(&line, &mut current).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Quit) => break,
                Err(e) if e.fatal => return Err(e),
                Err(e) => e.print(),
            },
            Ok(Some(Err(e))) => CliError::new(format!("reading a line from stdin failed: {e}"))
                .hint("send UTF-8 text")
                .print(),
            Err(_) => {}
        }
        let before = chat.client.groups();
        match chat.client.receive(RECEIVE_WAIT).await {
            Ok(events) => {
                chat.print_events(&events);
                chat.print_removals(&before, &events);
            }
            Err(e) if chat.failover && matches!(e, ClientError::Disconnected(_)) => {
                chat.move_on(e, &before).await?;
            }
            Err(e) => {
                let unavailable = e.code() == Some(ErrorCode::Unavailable);
                let mut error = sdk_error("receiving messages", e);
                if error.fatal {
                    return Err(error);
                }
                if unavailable {
                    error.hint = Some(
                        "the node may be catching up or finding its peers; this session reads \
                         again in a moment"
                            .into(),
                    );
                }
                error.print();
            }
        }
        if let Some(group) = &current
            && !chat.client.groups().contains(group)
        {
            eprintln!(
                "this device is no longer a member of group {group}; select another group with \
                 /group"
            );
            current = None;
        }
    }
    Ok(())
}

/// Reads stdin lines on a plain thread and sends them to the returned channel, which closes at
/// the end of input. A blocking read cannot be cancelled, and on a Tokio blocking thread it
/// would keep the runtime from shutting down after `/quit`.
fn spawn_stdin_reader() -> mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            // Invalid UTF-8 is reported and skipped, but other read errors end the input.
            let stop = matches!(&line, Err(e) if e.kind() != std::io::ErrorKind::InvalidData);
            if tx.blocking_send(line).is_err() || stop {
                break;
            }
        }
    });
    rx
}

impl Chat {
    /// Moves an `interactive` session whose connection was `lost` to the next node of
    /// `--server` that accepts, and prints what the failover's sync read. `before` lists the
    /// groups before the read that failed. Fails when no node accepts.
    async fn move_on(&mut self, lost: ClientError, before: &[GroupId]) -> Result<(), CliError> {
        let node = self
            .client
            .current_node()
            .map_or_else(|| "the node".to_owned(), |n| n.url.clone());
        eprintln!("lost the connection to {node} ({lost}); connecting to another node");
        self.client.fail_over().await.map_err(|e| {
            sdk_error("connecting to another node", e)
                .hint("check that a node of --server runs, then start the session again")
        })?;
        if let Some(now) = self.client.current_node() {
            eprintln!("connected to {}", now.url);
        }
        let missed = self.client.take_missed();
        self.print_events(&missed);
        self.print_removals(before, &missed);
        Ok(())
    }

    /// Runs one `interactive` line: a `/` command, or a message for the current group.
    async fn handle_line(
        &mut self,
        line: &str,
        current: &mut Option<GroupId>,
    ) -> Result<Flow, CliError> {
        if line.trim().is_empty() {
            return Ok(Flow::Continue);
        }
        if let Some(text) = line.strip_prefix("//") {
            let group = current_group(current)?;
            self.send(&group, &format!("/{text}")).await?;
            return Ok(Flow::Continue);
        }
        let Some(command) = line.strip_prefix('/') else {
            let group = current_group(current)?;
            self.send(&group, line).await?;
            return Ok(Flow::Continue);
        };
        let mut words = command.split_whitespace();
        let name = words.next().unwrap_or_default();
        let args: Vec<String> = words.map(str::to_owned).collect();
        match name {
            "create" => {
                let group_name = command[name.len()..].trim();
                let group = self.create_group(group_name).await?;
                outln!("created group {group}, now the current group");
                *current = Some(group);
            }
            "join" => {
                if self.sync().await? == 0 {
                    eprintln!("no new events");
                }
            }
            "add" | "remove" if args.is_empty() => {
                return Err(CliError::new(format!("/{name} needs at least one account"))
                    .hint(format!("type /{name} ACCOUNT...")));
            }
            "add" => self.add(&current_group(current)?, &args).await?,
            "remove" => self.remove(&current_group(current)?, &args).await?,
            "group" => {
                let [text] = args.as_slice() else {
                    return Err(CliError::new("/group needs exactly one group id")
                        .hint("type /group GROUP_HEX with an id that /groups lists"));
                };
                let group = parse_group_id(text).map_err(|e| {
                    CliError::new(format!("invalid group id {text:?}: {e}"))
                        .hint("type /group GROUP_HEX with an id that /groups lists")
                })?;
                self.require_group(&group)?;
                eprintln!("the current group is {group}");
                *current = Some(group);
            }
            "groups" => {
                if self.print_groups(current.as_ref()) == 0 {
                    eprintln!("this device belongs to no group; type /create NAME or /join");
                }
            }
            "help" => eprintln!("{INTERACTIVE_HELP}"),
            "quit" => return Ok(Flow::Quit),
            _ => {
                return Err(
                    CliError::new(format!("unknown command /{}", escape_controls(name))).hint(
                        "type /help for the list of commands, or start the line with // to send it",
                    ),
                );
            }
        }
        Ok(Flow::Continue)
    }
}

/// Prints `lines` by their sequence numbers, in one group.
fn print_in_order(mut lines: Vec<(u64, String)>) {
    lines.sort_by_key(|(seq, _)| *seq);
    for (_, line) in lines {
        outln!("{line}");
    }
}

fn current_group(current: &Option<GroupId>) -> Result<GroupId, CliError> {
    current.clone().ok_or_else(|| {
        CliError::new("no current group is selected").hint(
            "select one with /group GROUP_HEX (/groups lists them) or create one with /create \
             NAME",
        )
    })
}
