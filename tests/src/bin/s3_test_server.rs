//! An S3 protocol server (s3s-fs) on loopback for tests of the binaries:
//! `mysnap-s3-test-server --root DIR --listen 127.0.0.1:PORT`, credentials from
//! AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Prints the bound address as one
//! line on stdout, then serves until killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Serve a directory over the S3 protocol (SigV4) for tests")]
struct Args {
    /// Directory holding one subdirectory per bucket (created if missing).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            eprintln!("mysnap-s3-test-server: set {name} (credentials are read from the environment only)");
            std::process::exit(2);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let access_key = env("AWS_ACCESS_KEY_ID");
    let secret_key = env("AWS_SECRET_ACCESS_KEY");
    std::fs::create_dir_all(&args.root)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addr}")?;
        out.flush()?;
    }
    mysnap_tests::serve(listener, args.root, access_key, secret_key).await
}
