"""The ``lora-da`` command line's parser and main (``lora_da.cli``); the commands are in test_cli_*.py."""



from lora_da import cli


def test_argparse_errors_exit_2(capsys):
    assert cli.main(["init", "--model", "x"]) == 2
    assert cli.main(["--help"]) == 0
    assert "init" in capsys.readouterr().out


def test_defaults_come_from_the_config():
    from lora_da.config import LoraDAConfig
    from lora_da.methods import METHODS

    defaults = LoraDAConfig()
    parser = cli.build_parser()
    for argv in (["init", "--model", "m", "--data", "d.jsonl", "--out", "o"], ["demo"]):
        args = parser.parse_args(argv)
        for name in ("alpha", "beta", "gamma", "damping", "token_mask", "seed", "rank", "method"):
            assert getattr(args, name) == getattr(defaults, name), (argv[0], name)
    assert parser.parse_args(["bench", "--model", "m", "--data", "d.jsonl"]).rank == defaults.rank
    method = next(a for a in parser._subparsers._group_actions[0].choices["init"]._actions if a.dest == "method")
    assert list(method.choices) == list(METHODS)
