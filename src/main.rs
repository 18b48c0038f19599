fn main() -> std::process::ExitCode {
    stochflow::cli::main()
}
