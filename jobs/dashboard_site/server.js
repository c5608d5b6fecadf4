// No model here: `latentstore dashboard --serve` answers this file with what it has loaded,
// and the prompt page then offers a box for typed prompts.
LS.receive("server", null);
