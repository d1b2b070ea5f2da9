# METADATA
# title: Identity normalisation and principal classification
# description: >-
#   Stable identities are compared after normalisation. Python already applies NFKC + casefold + removal of
#   invisible characters before it sends the input; this package repeats what Rego can (strip invisible
#   characters, trim, lower) so a caller that skipped the Python side cannot split one human into two.
package pilothouse.identity

# Zero-width and other invisible code points that display as nothing: soft hyphen, combining grapheme joiner,
# Arabic letter mark, Hangul fillers, Khmer inherent vowels, Mongolian selectors, ZW space/joiners and bidi marks,
# bidi embeddings, word joiner and invisible operators, BOM, variation selectors and the Unicode tag block.
invisible_pattern := `[\x{00AD}\x{034F}\x{061C}\x{115F}\x{1160}\x{17B4}\x{17B5}\x{180B}-\x{180F}\x{200B}-\x{200F}\x{202A}-\x{202E}\x{2060}-\x{206F}\x{3164}\x{FE00}-\x{FE0F}\x{FEFF}\x{FFA0}\x{E0000}-\x{E007F}\x{E0100}-\x{E01EF}]`

# normalise returns the comparable form of a stable identity id.
# Fast path: an id made only of URL-unreserved ASCII (letters, digits, - . _ ~; what the Python side sends for
# ordinary accounts) cannot hold an invisible character, so the regex pass would change nothing.
normalise(id) := lower(id) if {
	urlquery.encode(id) == id
} else := lower(trim_space(regex.replace(id, invisible_pattern, "")))

# One builtin call instead of a loop over the prefixes (cheaper per principal checked).
non_human_prefix(id) if strings.any_prefix_match(id, data.pilothouse.config.non_human_prefixes)

# is_human holds only for a principal that says it is human AND is not a known service or model principal, whatever
# kind it claims: a service principal that claims to be human is still refused.
is_human(principal) if is_human_with_id(principal, normalise(principal.id))

# is_human_with_id is is_human for a caller that already normalised the principal's id (saves a regex per call).
is_human_with_id(principal, id) if {
	principal.kind == "human"
	id != ""

	# config ids are plain lower-case ASCII, the normalised form already: a direct membership test suffices.
	not id in data.pilothouse.config.service_principals
	not non_human_prefix(id)
}

roles(principal) := {lower(trim_space(r)) | some r in principal.roles}

has_any_role(principal, wanted) if {
	some r in roles(principal)
	r in wanted
}
