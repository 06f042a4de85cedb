"""Mirrors vLLM's examples/offline_inference/structured_outputs.py: one request per kind of constraint
(a choice, a regex, a JSON schema from a pydantic model, an EBNF grammar), each output valid by
construction.

A vLLM user changes only `from vllm import ...` to `from nanovllm import ...` (and
`vllm.sampling_params` to `nanovllm.sampling_params`). Needs xgrammar: pip install "nano-vllm[structured]".

    python examples/offline_inference/structured_outputs.py [--model MODEL]

MODEL defaults to a tiny random-weight Qwen3 built into ~/.cache/nano-vllm/ on first use (its choices are
arbitrary but always well-formed); any local model directory or a cached hub id works.
"""

import argparse
from enum import StrEnum

from pydantic import BaseModel

from nanovllm import LLM, SamplingParams
from nanovllm.sampling_params import StructuredOutputsParams
from nanovllm.utils.builtin_model import get_builtin_model


class CarType(StrEnum):
    sedan = "sedan"
    suv = "SUV"
    truck = "Truck"
    coupe = "Coupe"


class CarDescription(BaseModel):
    brand: CarType
    model: CarType
    car_type: CarType


# A SELECT of one column from one table with one condition: the shape of vLLM's SQL grammar example.
sql_grammar = """
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""

requests = {
    "choice": (
        "Classify this sentiment: vLLM is wonderful!",
        StructuredOutputsParams(choice=["Positive", "Negative"]),
    ),
    "regex": (
        "Generate an email address for Alan Turing, who works in Enigma. End in .com and new line.",
        StructuredOutputsParams(regex=r"[a-z]{2,8}@[a-z]{2,8}\.com\n"),
    ),
    "json": (
        "Generate a JSON with the brand, model and car_type of the most iconic car from the 90's",
        StructuredOutputsParams(json=CarDescription.model_json_schema(), disable_any_whitespace=True),
    ),
    "grammar": (
        "Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
        StructuredOutputsParams(grammar=sql_grammar),
    ),
}


def main(model: str) -> None:
    llm = LLM(model=model, max_model_len=1024)
    for name, (prompt, constraint) in requests.items():
        params = SamplingParams(structured_outputs=constraint, max_tokens=100)
        outputs = llm.generate(prompt, sampling_params=params)
        print(f"{name}: {outputs[0].outputs[0].text!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id")
    args = parser.parse_args()
    main(args.model or get_builtin_model("tiny-qwen3"))
